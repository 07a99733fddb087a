"""`reweight` and `mix` end to end on a tiny LM: designed corruption, resume, two processes, outputs."""

import csv
import json
import random
from collections import Counter

import pytest
import torch

from lmrefinery.baselines.mixture import mixture_counts
from lmrefinery.data.builders import corrupt_answers, write_jsonl
from lmrefinery.train.run_dir import read_metrics
from tests.helpers import (final_weights, resumed_after_kill, run_cli, run_one_and_two_processes, write_yaml)
from tests.tiny import save_tiny_model

RATES = (0.0, 0.3, 0.6, 1.0)
NAMES = ("clean", "c30", "c60", "c100")


def _arithmetic(count, seed):
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        a, b = rng.randrange(6), rng.randrange(6)
        records.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                     {"role": "assistant", "content": f"It is {a + b}."}]})
    return records


def _reweight_config(tmp_path, model_dir, seed=0, **train):
    """4 sources cut from one clean dataset, answers corrupted ('.') at rates 0, 0.3, 0.6, 1.0."""
    pool = _arithmetic(160, seed)
    sources = []
    for index, (name, rate) in enumerate(zip(NAMES, RATES)):
        path = write_jsonl(tmp_path / f"{name}.jsonl", corrupt_answers(pool[40 * index: 40 * (index + 1)], rate,
                                                                        seed=seed + index))
        sources.append({"name": name, "path": str(path)})
    validation = write_jsonl(tmp_path / "val.jsonl", _arithmetic(32, seed + 100))
    settings = {"steps": 60, "batch_size": 16, "val_batch_size": 8, "micro_batch_size": 8, "warmup_ratio": 0.0}
    settings.update(train)
    return {"output_dir": str(tmp_path / "run"), "seed": seed, "model": {"name_or_path": str(model_dir)},
            "data": {"sources": sources, "max_length": 64},
            "validation": {"sources": [{"name": "val", "path": str(validation)}]},
            "scalebio": {"alpha": 10, "lr_lower": 3e-3, "lr_upper": 3e-3, "lr_weights": 0.05},
            "train": settings}


def assert_ordered_by_corruption(tmp_path, config: dict) -> None:
    """Run `reweight` on the designed sources: the cleaner a source, the higher its weight, the clean one above 0.4."""
    assert run_cli("reweight", "--config", write_yaml(tmp_path / "rw.yaml", config)) == 0
    result = json.loads((tmp_path / "run" / "weights.json").read_text())
    weights = result["weights"]
    ordered = [weights[name] for name in NAMES]
    assert ordered == sorted(ordered, reverse=True), weights
    assert ordered[0] > 0.4
    # the corruption pushes λ consistently: the settle guard sees a signal (and so does not warn)
    assert result["lambda_gradient_signal"]["settled"], result["lambda_gradient_signal"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_are_ordered_by_corruption(tmp_path, seed):
    model_dir = save_tiny_model(tmp_path / "model", "llama", seed=seed)
    assert_ordered_by_corruption(tmp_path, _reweight_config(tmp_path, model_dir, seed))


def test_outputs(tmp_path, tiny_model_dir):
    config = write_yaml(tmp_path / "rw.yaml", _reweight_config(tmp_path, tiny_model_dir, steps=4))
    assert run_cli("reweight", "--config", config, "save_upper_model=true") == 0
    run = tmp_path / "run"
    result = json.loads((run / "weights.json").read_text())
    assert list(result["weights"]) == list(NAMES) and sum(result["weights"].values()) == pytest.approx(1.0)
    assert result["source_sizes"] == dict.fromkeys(NAMES, 40) and result["steps"] == 4 and result["alpha"] == 10
    rows = list(csv.reader((run / "weights.csv").open()))
    assert rows[0] == ["step", *NAMES] and [r[0] for r in rows[1:]] == ["0", "1", "2", "3", "4"]
    assert [float(v) for v in rows[-1][1:]] == pytest.approx([result["weights"][n] for n in NAMES], abs=1e-6)
    assert (run / "plots" / "weights.png").stat().st_size > 1000 and (run / "plots" / "losses.png").exists()
    report = (run / "report.md").read_text()
    assert "| clean | 40 |" in report and "plots/weights.png" in report
    assert (run / "upper_model" / "config.json").exists()


def test_resume_gives_the_same_final_weights(tmp_path, tiny_model_dir):
    config = _reweight_config(tmp_path, tiny_model_dir, steps=6, checkpoint_every=3, keep_last=5)
    config["lisa"] = {"enabled": True, "layers": 1, "interval": 2}
    run, reference = resumed_after_kill(tmp_path, "reweight", config, 3, 6,
                                        ("weights.json", "weights.csv", "report.md"))
    resumed = json.loads((run / "weights.json").read_text())["weights"]
    expected = json.loads((reference / "weights.json").read_text())["weights"]
    for name in NAMES:
        assert resumed[name] == pytest.approx(expected[name], abs=1e-6)
    for model in ("lower", "upper"):
        final, reference_model = final_weights(run, 6, model), final_weights(reference, 6, model)
        for key in final:
            torch.testing.assert_close(final[key], reference_model[key], atol=1e-6, rtol=0)


def same_weights_on_one_and_two_processes(tmp_path, config: dict):
    """Run `reweight` in-process and under a 2-process torchrun: the learned weights agree to 1e-5 (and moved)."""
    single, double = run_one_and_two_processes(tmp_path, "reweight", config)
    one = json.loads((single / "weights.json").read_text())["weights"]
    two = json.loads((double / "weights.json").read_text())["weights"]
    for name in NAMES:
        assert two[name] == pytest.approx(one[name], abs=1e-5)
    assert one["clean"] != pytest.approx(0.25, abs=1e-4)  # the weights did move
    return single, double


def test_two_processes_give_the_same_weights(tmp_path, tiny_model_dir):
    """…and the same alignment diagnostic, whose sums run over each process's parameter shards."""
    config = _reweight_config(tmp_path, tiny_model_dir, steps=5, micro_batch_size=4)
    config["scalebio"]["log_alignment"] = True
    single, double = same_weights_on_one_and_two_processes(tmp_path, config)
    alignments = [[m["alignment"] for m in read_metrics(run / "metrics.jsonl") if "alignment" in m]
                  for run in (single, double)]
    assert alignments[0][0] is None and len(alignments[0]) == 5
    assert alignments[1][1:] == pytest.approx(alignments[0][1:], abs=1e-5)
    assert all(-1 <= value <= 1 for value in alignments[0][1:])


@pytest.mark.parametrize("total, weights, expected", [
    (10, [0.5, 0.3, 0.2], [5, 3, 2]),
    (10, [0.34, 0.33, 0.33], [4, 3, 3]),          # one left over: largest remainder (0.4) goes to the first
    (7, [0.1, 0.45, 0.45], [1, 3, 3]),            # remainders 0.7/0.15/0.15: source 0 gets the top-up
    (5, [0.2, 0.2, 0.2, 0.2, 0.2], [1, 1, 1, 1, 1]),
])
def test_mixture_counts(total, weights, expected):
    assert mixture_counts(total, weights) == expected


def test_mix_draws_by_weights_and_reports(tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", _arithmetic(5, 0))
    large = write_jsonl(tmp_path / "large.jsonl", [{"instruction": f"Say {i}.", "output": str(i)} for i in range(50)])
    weights = tmp_path / "weights.json"
    weights.write_text(json.dumps({"weights": {"small": 0.6, "large": 0.4}}))
    config = {"output_dir": str(tmp_path / "mix"), "weights": str(weights), "num_examples": 20, "seed": 3,
              "data": {"sources": [{"name": "small", "path": str(small)}, {"name": "large", "path": str(large)}]}}
    assert run_cli("mix", "--config", write_yaml(tmp_path / "mix.yaml", config)) == 0
    records = [json.loads(line) for line in (tmp_path / "mix" / "mix.jsonl").read_text().splitlines()]
    manifest = json.loads((tmp_path / "mix" / "manifest.json").read_text())
    assert Counter(r["source"] for r in records) == {"small": 12, "large": 8}
    assert manifest["sources"]["small"] == {"weight": 0.6, "count": 12, "available": 5, "without_replacement": 5,
                                            "with_replacement": 7}
    small_texts = {json.dumps(r["messages"]) for r in records if r["source"] == "small"}
    assert len(small_texts) == len({json.dumps(r["messages"]) for r in _arithmetic(5, 0)})  # every one used
    large_texts = [json.dumps(r["messages"]) for r in records if r["source"] == "large"]
    assert len(set(large_texts)) == 8  # no repeats while the source lasts
    assert all("messages" in r for r in records)
    assert run_cli("mix", "--config", tmp_path / "mix.yaml", f"output_dir={tmp_path / 'again'}") == 0
    assert (tmp_path / "again" / "mix.jsonl").read_text() == (tmp_path / "mix" / "mix.jsonl").read_text()


def test_mix_rejects_weights_that_do_not_name_the_sources(tmp_path, capsys):
    small = write_jsonl(tmp_path / "small.jsonl", _arithmetic(5, 0))
    config = {"output_dir": str(tmp_path / "mix"), "weights": {"other": 1.0}, "num_examples": 3,
              "data": {"sources": [{"name": "small", "path": str(small)}]}}
    assert run_cli("mix", "--config", write_yaml(tmp_path / "mix.yaml", config)) == 2
    assert "weights: weights must name exactly the configured sources ['small']; missing ['small'], unknown ['other']" \
        in capsys.readouterr().err
    assert not (tmp_path / "mix").exists()


def test_reweight_warns_when_the_weights_are_pushed_by_noise_alone(tmp_path, tiny_model_dir, caplog):
    """Four sources drawn from one distribution: every λ-gradient is batch noise (its expectation is 0), so the
    guard must find no consistent push and warn with the remedies; the designed-corruption runs above must not."""
    pool = _arithmetic(160, 7)
    sources = [{"name": f"same{i}", "path": str(write_jsonl(tmp_path / f"s{i}.jsonl", pool[40 * i: 40 * (i + 1)]))}
               for i in range(4)]
    config = _reweight_config(tmp_path, tiny_model_dir, 0, steps=24)
    config["data"]["sources"] = sources
    with caplog.at_level("WARNING"):
        assert run_cli("reweight", "--config", write_yaml(tmp_path / "rw.yaml", config)) == 0
    signal = json.loads((tmp_path / "run" / "weights.json").read_text())["lambda_gradient_signal"]
    assert not signal["settled"] and signal["window_steps"] == 6
    warnings = [r.getMessage() for r in caplog.records if "have not settled" in r.getMessage()]
    assert len(warnings) == 1 and "train.sampling=stratified" in warnings[0]
    assert "Not settled" in (tmp_path / "run" / "report.md").read_text()


def _active_blocks(run, name: str) -> list:
    return [(m["step"], m["active_layers"]) for m in read_metrics(run / "metrics.jsonl")
            if m.get("event") == f"lisa_{name}"]


@pytest.mark.parametrize("draw", ["shared", "independent"])
def test_lisa_draw_shared_gives_u_and_w_the_same_blocks_at_every_step(tmp_path, tiny_model_dir, draw):
    model_dir = save_tiny_model(tmp_path / "deep", "llama", seed=0, layers=4)
    config = _reweight_config(tmp_path, model_dir, steps=12)
    config["lisa"] = {"enabled": True, "layers": 1, "interval": 2}
    config["scalebio"]["lisa_draw"] = draw
    assert run_cli("reweight", "--config", write_yaml(tmp_path / "rw.yaml", config)) == 0
    lower, upper = _active_blocks(tmp_path / "run", "lower"), _active_blocks(tmp_path / "run", "upper")
    assert len(lower) == len(upper) == 6
    assert (lower == upper) == (draw == "shared")


def test_lisa_draw_shared_on_one_and_two_processes(tmp_path, tiny_model_dir):
    config = _reweight_config(tmp_path, tiny_model_dir, steps=4, micro_batch_size=4)
    config["lisa"] = {"enabled": True, "layers": 1, "interval": 2}
    config["scalebio"]["lisa_draw"] = "shared"
    same_weights_on_one_and_two_processes(tmp_path, config)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_first_steps_of_a_constant_schedule_run_are_the_shorter_run(tmp_path, tiny_model_dir, schedule):
    """`compare`'s equal-compute ScaleBiO reads the weights a long run logged after step N as the N-step run's: true
    with a constant schedule and no warm-up (stratified batches, LISA switching mid-run), not with a decay."""
    from lmrefinery.recipes.reweight import weight_trajectory

    runs = {}
    for steps in (3, 6):
        config = _reweight_config(tmp_path / str(steps), tiny_model_dir, steps=steps, batch_size=8,
                                  micro_batch_size=4, schedule=schedule, sampling="stratified")
        config["lisa"] = {"enabled": True, "layers": 1, "interval": 2}
        assert run_cli("reweight", "--config", write_yaml(tmp_path / f"rw{steps}.yaml", config)) == 0
        runs[steps] = tmp_path / str(steps) / "run"
    short = json.loads((runs[3] / "weights.json").read_text())["weights"]
    logged = weight_trajectory(runs[6])
    assert sorted(logged) == list(range(1, 7))
    assert logged[6] == json.loads((runs[6] / "weights.json").read_text())["weights"]
    if schedule == "constant":
        assert logged[3] == short
    else:
        assert max(abs(logged[3][name] - short[name]) for name in short) > 1e-6


def test_compiled_blocks_give_the_eager_weights_under_lisa(tmp_path, tiny_model_dir):
    """`model.compile: true` on u and w (LISA's shared draw freezing and thawing blocks; train and validation passes,
    with and without gradients): the same source weights, step by step, as the eager run."""
    trajectories = []
    for compiled in (False, True):
        config = _reweight_config(tmp_path / str(compiled), tiny_model_dir, steps=6)
        config["lisa"] = {"enabled": True, "layers": 1, "interval": 2}
        config["model"]["compile"] = compiled
        assert run_cli("reweight", "--config", write_yaml(tmp_path / f"rw-{compiled}.yaml", config)) == 0
        trajectories.append([[m["weights"][name] for name in NAMES]
                             for m in read_metrics(tmp_path / str(compiled) / "run" / "metrics.jsonl")
                             if "event" not in m and "weights" in m])
    assert len(trajectories[0]) == 6
    torch.testing.assert_close(torch.tensor(trajectories[1]), torch.tensor(trajectories[0]), atol=1e-6, rtol=0)
    assert max(abs(w - 0.25) for w in trajectories[0][-1]) > 0.01  # the weights did move


def test_reweight_warns_when_it_computes_in_bf16(monkeypatch, caplog):
    """bf16 rounding can outweigh the loss differences the λ-gradient is made of: a run that resolves to bf16 says so
    (explicitly or through `auto` on bf16 hardware); fp32 does not."""
    import logging

    from lmrefinery.recipes.reweight import warn_if_bf16

    caplog.set_level(logging.WARNING)
    assert warn_if_bf16("bf16", "cpu") and "bf16 rounding" in caplog.text
    caplog.clear()
    assert not warn_if_bf16("fp32", "cpu") and caplog.text == ""
    monkeypatch.setenv("LMREFINERY_AUTO_PRECISION", "bf16")
    assert warn_if_bf16("auto", "cpu")
    monkeypatch.setenv("LMREFINERY_AUTO_PRECISION", "fp32")
    assert not warn_if_bf16("auto", "cpu")
