"""The lm-evaluation-harness bridge: `evaluate --task lm-eval` on the shipped local task (offline, tiny model) reports
lm-eval's own accuracy and our calibration of the same scores; `calibration FILE` on the samples file lm-eval wrote
gives the same report; the calibration metrics are those of the log-likelihoods lm-eval logged, computed by a
maintained library."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lmrefinery.evaluation.lm_eval_samples import parse_sample, task_name
from tests.helpers import run_cli, write_yaml

pytest.importorskip("lm_eval")

SHIPPED_TASK = Path(__file__).parent.parent / "lm_eval_tasks" / "arithmetic_mcq" / "arithmetic_mcq.yaml"


@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory, tiny_model_dir):
    directory = tmp_path_factory.mktemp("lm-eval")
    config = write_yaml(directory / "c.yaml", {
        "task": "lm-eval", "output_dir": str(directory / "out"), "model": {"name_or_path": str(tiny_model_dir)},
        "tasks": [str(SHIPPED_TASK)], "limit": 24, "batch_size": 8})
    assert run_cli("evaluate", "--config", config) == 0
    return directory / "out"


def _samples_file(out: Path) -> Path:
    (path,) = (out / "lm-eval").glob("samples_lmrefinery_arithmetic_mcq_*.jsonl")
    return path


def test_evaluate_lm_eval_reports_lm_evals_accuracy_and_the_calibration_of_the_same_scores(lm_eval_run):
    report = json.loads((lm_eval_run / "eval.json").read_text())
    (results_file,) = (lm_eval_run / "lm-eval").glob("results_*.json")  # lm-eval's own results file
    lm_eval_results = json.loads(results_file.read_text())["results"]
    ours = report["calibration"]["lmrefinery_arithmetic_mcq"]
    theirs = lm_eval_results["lmrefinery_arithmetic_mcq"]
    assert ours["acc"]["items"] == 24
    for scoring in ("acc", "acc_norm"):
        assert report["lm_eval"]["lmrefinery_arithmetic_mcq"][scoring] == theirs[f"{scoring},none"]
        assert ours[scoring]["accuracy"] == pytest.approx(theirs[f"{scoring},none"], abs=1e-12)
        assert (lm_eval_run / "plots" / f"reliability-lmrefinery_arithmetic_mcq-{scoring}.png").stat().st_size > 0


def test_calibration_metrics_equal_torchmetrics_on_the_logged_log_likelihoods(lm_eval_run):
    """Independent of our parser: the option log-likelihoods read straight from lm-eval's file, softmaxed, scored by
    torchmetrics (ECE) and by the textbook Brier / NLL formulas."""
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    rows = [json.loads(line) for line in _samples_file(lm_eval_run).read_text().splitlines()]
    loglik = torch.tensor([[float(r[0]) for r in row["filtered_resps"]] for row in rows], dtype=torch.float64)
    gold = torch.tensor([int(row["target"]) for row in rows])
    probabilities = torch.softmax(loglik, dim=1)
    ours = json.loads((lm_eval_run / "eval.json").read_text())["calibration"]["lmrefinery_arithmetic_mcq"]["acc"]
    reference_ece = multiclass_calibration_error(probabilities.float(), gold, num_classes=4, n_bins=10, norm="l1")
    assert ours["ece"] == pytest.approx(float(reference_ece), abs=1e-6)
    one_hot = torch.nn.functional.one_hot(gold, 4).double()
    assert ours["brier"] == pytest.approx(float(((probabilities - one_hot) ** 2).sum(1).mean()), abs=1e-12)
    assert ours["nll"] == pytest.approx(float(-probabilities[torch.arange(len(gold)), gold].log().mean()), abs=1e-12)
    assert ours["accuracy"] == pytest.approx(np.mean([row["acc"] for row in rows]), abs=1e-12)


def test_calibration_command_on_a_saved_samples_file_gives_the_same_report(lm_eval_run, tmp_path, capsys):
    samples = _samples_file(lm_eval_run)
    assert run_cli("calibration-report", str(samples), f"output_dir={tmp_path / 'report'}") == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((tmp_path / "report" / "calibration.json").read_text())["tasks"]
    expected = json.loads((lm_eval_run / "eval.json").read_text())["calibration"]
    assert task_name(samples) == "lmrefinery_arithmetic_mcq"
    for scoring in ("acc", "acc_norm"):
        assert report["lmrefinery_arithmetic_mcq"][scoring] == expected["lmrefinery_arithmetic_mcq"][scoring]
        assert printed["lmrefinery_arithmetic_mcq"][scoring]["ece"] == round(
            expected["lmrefinery_arithmetic_mcq"][scoring]["ece"], 4)


def _sample(loglik, continuations, target, acc=None, acc_norm=None):
    row = {"doc_id": 0, "target": str(target), "filtered_resps": [[str(v), "False"] for v in loglik],
           "arguments": {f"gen_args_{i}": {"arg_0": "Q:", "arg_1": c} for i, c in enumerate(continuations)}}
    return row | ({"acc": acc} if acc is not None else {}) | ({"acc_norm": acc_norm} if acc_norm is not None else {})


def test_acc_norm_probabilities_divide_by_the_choice_length_without_the_delimiter():
    # " yes" (3 characters without the delimiter) and " no way" (6): log-likelihoods −3 and −4.5 → per character −1
    # and −0.75, so acc prefers "yes" and acc_norm prefers "no way".
    item = parse_sample(_sample([-3.0, -4.5], [" yes", " no way"], 1, acc=0.0, acc_norm=1.0), "f line 1")
    assert item.gold == 1
    assert item.probabilities("acc") == pytest.approx([1 / (1 + math.exp(-1.5)), 1 / (1 + math.exp(1.5))])
    assert item.probabilities("acc_norm") == pytest.approx([1 / (1 + math.exp(0.25)), 1 / (1 + math.exp(-0.25))])


def test_a_target_written_as_the_choice_text_is_read_as_the_choice_lm_eval_scored():
    # lm-eval logs str(target): with numeric choices "2" may be the index 2 or the choice " 2". The option with the
    # highest log-likelihood is " 2" (index 1); lm-eval's recorded acc says which reading it used.
    loglik, choices = [-3.0, -1.0, -2.0], [" 7", " 2", " 5"]
    assert parse_sample(_sample(loglik, choices, "2", acc=1.0), "f line 1").gold == 1
    assert parse_sample(_sample(loglik, choices, "2", acc=0.0), "f line 1").gold == 2


def test_a_bad_samples_file_exits_2_naming_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "samples_t_2026-01-01T00-00-00.000.jsonl"
    rows = [_sample([-1.0, -2.0], [" A", " B"], 0, acc=1.0), {"doc_id": 1, "target": "0", "filtered_resps": []}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_cli("calibration-report", str(path), f"output_dir={tmp_path / 'r'}") == 2
    err = capsys.readouterr().err
    assert f"{path} line 2" in err and "filtered_resps" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
    # recorded scores the log-likelihoods cannot reproduce: refused rather than reported wrongly
    path.write_text(json.dumps(_sample([-1.0, -2.0], [" A", " B"], 0, acc=0.0)) + "\n")
    assert run_cli("calibration-report", str(path), f"output_dir={tmp_path / 'r'}") == 2
    assert "cannot be reproduced" in capsys.readouterr().err


def test_the_old_command_name_still_runs_with_a_one_line_notice(tmp_path, capsys):
    path = tmp_path / "samples_t_2026-01-01T00-00-00.000.jsonl"
    path.write_text(json.dumps(_sample([-1.0, -2.0], [" A", " B"], 0, acc=1.0)) + "\n")
    assert run_cli("calibration", str(path), f"output_dir={tmp_path / 'r'}") == 0
    notice = [line for line in capsys.readouterr().err.splitlines() if "calibration-report" in line]
    assert len(notice) == 1 and "'calibration' is now 'calibration-report'" in notice[0]
    assert (tmp_path / "r" / "calibration.json").exists()


def test_the_module_spelling_of_a_command_runs_it_silently(tmp_path, capsys):
    """`calibration_report` (underscores, the module's name) is the same command as `calibration-report`, no notice."""
    path = tmp_path / "samples_t_2026-01-01T00-00-00.000.jsonl"
    path.write_text(json.dumps(_sample([-1.0, -2.0], [" A", " B"], 0, acc=1.0)) + "\n")
    assert run_cli("calibration_report", str(path), f"output_dir={tmp_path / 'u'}") == 0
    assert run_cli("calibration-report", str(path), f"output_dir={tmp_path / 'd'}") == 0
    assert not [line for line in capsys.readouterr().err.splitlines() if "is now" in line]
    assert (tmp_path / "u" / "calibration.json").read_text() == (tmp_path / "d" / "calibration.json").read_text()
