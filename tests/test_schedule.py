"""Learning-rate schedules against their closed forms."""

import copy
import math

import pytest
import torch

from lmrefinery.config import TrainConfig
from lmrefinery.train.optim import build_adamw, build_scheduler, lr_multiplier


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_matches_formula(schedule):
    total, warmup, floor = 50, 5, 0.1
    for step in range(total):
        if step < warmup:
            expected = (step + 1) / warmup
        else:
            progress = (step - warmup) / (total - warmup)
            shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress,
                     "constant": None}[schedule]
            expected = 1.0 if shape is None else floor + (1 - floor) * shape
        assert lr_multiplier(step, total, warmup, schedule, floor) == pytest.approx(expected)


def test_scheduler_drives_optimizer_lr_and_weight_decay_groups():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    train = TrainConfig(lr=0.1, warmup_steps=2, schedule="linear", weight_decay=0.01)
    optimizer = build_adamw(model, train)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 4
    scheduler = build_scheduler(optimizer, train, total_steps=10)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.05, 0.1, 0.1, 0.1 * 7 / 8])


def test_adamw_runs_the_fused_kernel_on_cpu_and_matches_the_single_tensor_reference():
    """build_optimizer picks torch's fused AdamW on CPU (one pass over the state: docs/benchmarks.md). Its updates must
    be the reference single-tensor AdamW's (weight-decay groups included), and its state dict must continue in the
    reference optimizer — checkpoints written before the switch resume."""
    from lmrefinery.train.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    reference = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    reference.load_state_dict(model.state_dict())
    fused = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    assert fused.defaults["fused"] is True
    groups = [{"params": [p for p in reference.parameters() if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in reference.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    single = torch.optim.AdamW(groups, lr=1e-2, foreach=False, fused=False)

    def steps(count, start):
        for step in range(start, start + count):
            inputs = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
            for network, optimizer in ((model, fused), (reference, single)):
                optimizer.zero_grad()
                network(inputs).pow(2).mean().backward()
                optimizer.step()
        for ours, theirs in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)

    steps(5, 0)
    # the fused state continues in the reference: the same format (a copy, as a checkpoint file gives: loading shares
    # tensors of equal dtype and device)
    single.load_state_dict(copy.deepcopy(fused.state_dict()))
    steps(5, 5)
