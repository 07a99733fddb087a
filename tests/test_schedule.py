"""Learning-rate schedules against their closed forms."""

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
