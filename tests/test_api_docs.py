"""docs/api.md's examples run as written: every ```python block, in order, in one namespace."""

import re
from pathlib import Path

import lmrefinery

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_the_api_page_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    for index, block in enumerate(blocks):
        exec(compile(block, f"{DOC} block {index + 1}", "exec"), namespace)  # noqa: S102 — the doc is ours


def test_every_export_is_documented_and_has_a_docstring():
    text = DOC.read_text()
    for name in lmrefinery.__all__:
        assert f"`{name}`" in text, name
        assert (getattr(lmrefinery, name).__doc__ or "").strip(), name
