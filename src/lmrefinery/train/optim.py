"""AdamW and learning-rate schedules (cosine / linear / constant, each with linear warmup)."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmrefinery.config import TrainConfig


def build_adamw(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over every parameter, biases and norms exempt from weight decay (the usual HF convention).

    The optimizer covers all parameters even when some are frozen now, so that anything unfrozen later is updated.
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if parameter.ndim < 2 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr, betas=train.adam_betas,
                             eps=train.adam_eps, foreach=True)


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    if train.warmup_steps is not None:
        return min(train.warmup_steps, total_steps)
    return int(math.ceil(train.warmup_ratio * total_steps))


def lr_multiplier(step: int, total_steps: int, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Learning-rate factor for optimizer step `step` (0-based): linear warmup, then the chosen decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    warmup = warmup_steps(train, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup, train.schedule, train.min_lr_ratio))
