"""Checkpoints through torch.distributed.checkpoint: each rank writes its own shards, which hold exactly the state
PyTorch's state-dict API would gather; a checkpoint reloads at another number of processes and the run ends where an
uninterrupted run at that number ends; a save that dies on one rank leaves nothing that looks complete, and the run
then resumes bit-equal."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from lmrefinery.train.checkpoint_format import checkpoint_steps, read_checkpoint_state
from lmrefinery.train.checkpoint_load import full_tensors, load_checkpoint
from lmrefinery.train.distributed import DistEnv
from lmrefinery.train.optim import build_optimizer
from lmrefinery.train.state_tree import split_tensors
from tests.helpers import (REPO, cut_back, final_weights, losses, run_cli, run_torchrun, sft_config, torchrun,
                           write_yaml)
from tests.sharded_worker import OBJECTS
from tests.tiny import tiny_model


def test_each_rank_writes_its_shards_which_hold_the_gathered_state_and_reload_in_one_process(tmp_path):
    out = tmp_path / "run"
    result = torchrun(2, REPO / "tests" / "sharded_worker.py", out)
    assert result.returncode == 0, result.stderr[-3000:]
    step = out / "checkpoints" / "step-2"
    shards = sorted(step.glob("shard-*.safetensors"))
    sizes = [shard.stat().st_size for shard in shards]
    assert len(shards) == 2 and max(sizes) < 0.6 * sum(sizes)  # each rank wrote its own half; nothing gathered
    gathered = load_file(str(out / "gathered.safetensors"))
    stored = full_tensors(step, "")
    layout = read_checkpoint_state(step)["layout"]
    assert layout["modules"]["model"]["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert set(gathered) - set(stored) == {"module/model/lm_head.weight"}  # the tied head is stored once
    assert any(key.endswith("/exp_avg_sq") for key in stored)
    for key, tensor in stored.items():
        expected = OBJECTS["scalebio"]["logits"] if key == "objects/scalebio/logits" else gathered[key]
        assert torch.equal(tensor, expected), key

    # one process reloads the two processes' shards: every weight, every optimizer slot, the objects
    model = tiny_model("qwen2", seed=1)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    state = load_checkpoint(step, DistEnv(0, 1, 0, torch.device("cpu")), {"model": model},
                            {"model": (model, optimizer)})
    assert state["note"] == "sharded" and state["objects"]["scalebio"]["steps_done"] == 2
    assert torch.equal(state["objects"]["scalebio"]["logits"], OBJECTS["scalebio"]["logits"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, gathered[f"module/model/{key}"]), key
    _, slots = split_tensors(get_optimizer_state_dict(model, optimizer), "optimizer/model")
    assert slots.keys() == {key for key in gathered if key.startswith("optimizer/")}
    for key, value in slots.items():
        assert torch.equal(value, gathered[key]), key


def resumed_at_the_other_world_size(tmp_path: Path, command: str, config: dict, kept: int, final: int,
                                    modules: tuple[str, ...], outputs: tuple[str, ...], atol: float = 1e-5):
    """Run `config` uninterrupted with 1 and with 2 processes; cut each back to checkpoint `kept` and resume it at the
    other number: each resumed run ends where the uninterrupted run at its new number ends."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(command, "--config", write_yaml(tmp_path / "one.yaml", dict(config, output_dir=str(one)))) == 0
    result = run_torchrun(2, command, "--config", write_yaml(tmp_path / "two.yaml", dict(config, output_dir=str(two))))
    assert result.returncode == 0, result.stderr[-3000:]
    one_to_two, two_to_one = tmp_path / "one-to-two", tmp_path / "two-to-one"
    for source, copy in ((one, one_to_two), (two, two_to_one)):
        shutil.copytree(source, copy)
        cut_back(copy, kept, outputs)
    result = run_torchrun(2, command, "--config", write_yaml(tmp_path / "a.yaml", dict(config,
                                                                                      output_dir=str(one_to_two))),
                          "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_cli(command, "--config", write_yaml(tmp_path / "b.yaml", dict(config, output_dir=str(two_to_one))),
                   "--resume") == 0
    # The tolerance is what 1 and 2 processes already differ by in this very config (summation-order noise that Adam
    # can amplify on a near-zero gradient element), at least `atol`: a resume that restored the wrong state moves
    # whole tensors, far beyond it.
    spread = max((final_weights(one, final, name)[key] - tensor).abs().max().item()
                 for name in modules for key, tensor in final_weights(two, final, name).items())
    tolerance = max(atol, 2 * spread)
    for resumed, reference in ((one_to_two, two), (two_to_one, one)):
        assert losses(resumed) == pytest.approx(losses(reference), abs=1e-5)
        for name in modules:
            ours, theirs = final_weights(resumed, final, name), final_weights(reference, final, name)
            assert ours.keys() == theirs.keys()
            for key in ours:
                torch.testing.assert_close(ours[key], theirs[key], atol=tolerance, rtol=0)
                assert (ours[key] - theirs[key]).abs().gt(atol).float().mean() < 1e-3, key  # a few elements at most
        slots = full_tensors(resumed / "checkpoints" / f"step-{final}", "optimizer/")
        expected = full_tensors(reference / "checkpoints" / f"step-{final}", "optimizer/")
        assert slots.keys() == expected.keys()
        for key in slots:  # Adam's moments agree too (their square roots divide the step)
            torch.testing.assert_close(slots[key], expected[key], atol=max(atol, 1e-6), rtol=1e-3)
    return one_to_two, two_to_one, one, two


def _reweight(tmp_path: Path, model_dir: Path, lisa: bool = False, lora: bool = False) -> dict:
    from tests.test_lora import _lora_reweight_config
    from tests.test_reweight import _reweight_config

    make = _lora_reweight_config if lora else _reweight_config
    config = make(tmp_path, model_dir, steps=4, micro_batch_size=4, checkpoint_every=2, keep_last=5)
    if lisa:
        config["lisa"] = {"enabled": True, "layers": 1, "interval": 2}
    return config


def test_reweight_with_lisa_resumes_from_2_processes_at_1_and_from_1_at_2(tmp_path, tiny_model_dir):
    runs = resumed_at_the_other_world_size(tmp_path, "reweight", _reweight(tmp_path, tiny_model_dir, lisa=True), 2, 4,
                                           ("lower", "upper"), ("weights.json", "weights.csv", "report.md", "plots"))
    for resumed, reference in zip(runs[:2], runs[2:][::-1]):
        ours = json.loads((resumed / "weights.json").read_text())["weights"]
        theirs = json.loads((reference / "weights.json").read_text())["weights"]
        assert ours == pytest.approx(theirs, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "sft with LISA", "reweight", "reweight with LoRA", "distill"])
def test_every_trainer_resumes_at_the_other_world_size(tmp_path, tiny_model_dir, kind):
    if kind.startswith("sft"):
        config = sft_config(tmp_path, tiny_model_dir, steps=4, checkpoint_every=2, micro_batch_size=1)
        if kind == "sft with LISA":
            config["lisa"] = {"enabled": True, "layers": 1, "interval": 2}
        # lr 3e-3 × Adam: summation-order noise of near-zero gradients (see test_distributed) moves elements ~1e-5
        resumed_at_the_other_world_size(tmp_path, "sft", config, 2, 4, ("model",), ("model", "summary.json"),
                                        atol=3e-5)
    elif kind.startswith("reweight"):
        resumed_at_the_other_world_size(tmp_path, "reweight", _reweight(tmp_path, tiny_model_dir,
                                                                         lora=kind.endswith("LoRA")), 2, 4,
                                        ("adapters",) if kind.endswith("LoRA") else ("lower", "upper"),
                                        ("weights.json", "weights.csv", "report.md", "plots"))
    else:
        from tests.first_helpers import make_cache

        config = {"cache": str(make_cache(tmp_path, tiny_model_dir)),
                  "student": {"init": "keep-layers", "keep_layers": [1]},
                  "loss": {"teacher_transform": "prob_temperature", "temperature": 0.5},
                  "train": {"steps": 4, "batch_size": 4, "micro_batch_size": 1, "lr": 1e-3, "warmup_steps": 0,
                            "checkpoint_every": 2, "keep_last": 5}}
        resumed_at_the_other_world_size(tmp_path, "distill", config, 2, 4, ("model",), ("model", "summary.json"),
                                        atol=1e-4)


def test_a_rank_killed_inside_a_sharded_save_leaves_no_complete_step_and_the_run_resumes_bit_equal(tmp_path,
                                                                                                   tiny_model_dir):
    config = sft_config(tmp_path, tiny_model_dir, steps=6, checkpoint_every=2, micro_batch_size=1)
    reference = tmp_path / "reference"
    result = run_torchrun(2, "sft", "--config", write_yaml(tmp_path / "ref.yaml", dict(config,
                                                                                      output_dir=str(reference))))
    assert result.returncode == 0, result.stderr[-3000:]
    run = Path(config["output_dir"])
    path = write_yaml(tmp_path / "run.yaml", config)
    killed = torchrun(2, "-m", "lmrefinery", "sft", "--config", path, extra_path=REPO / "tests" / "kill_inside_save",
                      environment={"LMREFINERY_TEST_KILL_STEP": "4", "LMREFINERY_TEST_KILL_RANK": "1"})
    assert killed.returncode != 0
    assert checkpoint_steps(run) == [2]  # step 4 never looks complete
    partial = run / "checkpoints" / ".step-4.tmp-partial"
    assert list(partial.glob("shard-00002-*.safetensors"))  # rank 1 had written its shard when it died
    assert not (partial / "checksums.json").exists()
    result = run_torchrun(2, "sft", "--config", path, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_steps(run)[-1] == 6 and not partial.exists()
    ours, theirs = final_weights(run, 6), final_weights(reference, 6)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert losses(run) == losses(reference)
