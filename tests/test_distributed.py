"""A 2-process torchrun (gloo, FSDP2) run matches 1 process with the same global batch."""

import pytest
import torch

from lmrefinery.train.checkpoint_format import checkpoint_steps
from tests.helpers import final_weights, losses, run_one_and_two_processes, run_torchrun, sft_config


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_model_dir):
    config = sft_config(tmp_path, tiny_model_dir, steps=4, checkpoint_every=2, micro_batch_size=1)
    config["validation"] = {"sources": config["data"]["sources"][:1], "every": 2, "batch_size": 3}
    single, double = run_one_and_two_processes(tmp_path, "sft", config)
    assert losses(double) == pytest.approx(losses(single), abs=1e-5)
    final_single, final_double = final_weights(single, 4), final_weights(double, 4)
    for name in final_single:
        # lr 3e-3 × 4 Adam steps: a near-zero gradient's summation-order noise (ranks vs micro-batches) can move
        # one element by ~1e-5 after Adam's normalisation; a real mismatch moves whole tensors by ~1e-3
        torch.testing.assert_close(final_double[name], final_single[name], atol=3e-5, rtol=0)
    assert (tmp_path / "double" / "checkpoints" / "step-4" / "rng-rank1.json").exists()

    # Resume under torchrun from the sharded run's step-2 checkpoint reproduces the same end point.
    import shutil
    shutil.rmtree(tmp_path / "double" / "checkpoints" / "step-4")
    shutil.rmtree(tmp_path / "double" / "model")
    assert checkpoint_steps(tmp_path / "double") == [2]
    result = run_torchrun(2, "sft", "--config", tmp_path / "double.yaml", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = final_weights(tmp_path / "double", 4)
    for name in final_single:
        torch.testing.assert_close(resumed[name], final_double[name], atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cache", "online"])
def test_distill_two_processes_match_one(tmp_path, tiny_model_dir, mode):
    """The shared loop under torchrun with the top-k cache loss (each rank reads its examples' cache rows) and with
    online KD (each rank runs its own teacher replica): same losses and weights as one process."""
    from tests.first_helpers import make_cache

    cache = make_cache(tmp_path, tiny_model_dir)
    config = {"cache": str(cache), "student": {"init": "keep-layers", "keep_layers": [1]},
              "loss": {"mode": mode, "teacher_transform": "prob_temperature", "temperature": 0.5,
                       "other_bucket": mode == "cache"},
              "train": {"steps": 3, "batch_size": 4, "micro_batch_size": 1, "lr": 1e-3, "warmup_steps": 0,
                        "checkpoint_every": 3}}
    single, double = run_one_and_two_processes(tmp_path, "distill", config)
    assert losses(double) == pytest.approx(losses(single), abs=1e-5)
    assert losses(single)[0] > 1e-3  # a real, non-zero distillation loss
    final_single, final_double = final_weights(single, 3), final_weights(double, 3)
    for name in final_single:
        torch.testing.assert_close(final_double[name], final_single[name], atol=1e-4, rtol=0)
