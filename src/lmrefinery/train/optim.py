"""Optimizers (one weight-decay policy for every model the project trains) and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lmrefinery.config import ScheduleConfig, TrainConfig


def build_optimizer(parameters: nn.Module | Iterable[nn.Parameter], *, kind: str = "adamw", lr: float,
                    weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW (or SGD) over every parameter, with weight decay on matrices only: biases and norms (1-D) are exempt,
    the usual Hugging Face convention.

    The optimizer covers all parameters even when some are frozen now, so that anything unfrozen later (LISA) is
    updated.
    """
    params = list(parameters.parameters() if isinstance(parameters, nn.Module) else parameters)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **_adamw_kernel(params))
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {kind!r}")


def _adamw_kernel(params: list[nn.Parameter]) -> dict[str, bool]:
    """The fused AdamW kernel wherever torch has one for every parameter (CPU and CUDA floating-point tensors), else
    the multi-tensor one.

    On CPU `foreach` is a loop of per-tensor ops that walks the optimizer state several times per step; the fused
    kernel walks it once: 0.33 → 0.05 s per step for SmolLM2-135M on 2 cores (docs/benchmarks.md). Both compute the
    same update up to float rounding, and their state dicts are interchangeable.
    """
    fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return {"fused": True} if fusable else {"foreach": True}


def build_adamw(model: nn.Module, train: TrainConfig, trainable_only: bool = False) -> torch.optim.AdamW:
    """`trainable_only`: over the parameters that require grad now (LoRA adapters: the base is frozen for good)."""
    parameters = [p for p in model.parameters() if p.requires_grad] if trainable_only else model
    return build_optimizer(parameters, lr=train.lr, weight_decay=train.weight_decay, betas=train.adam_betas,
                           eps=train.adam_eps)


def warmup_steps(schedule: ScheduleConfig, total_steps: int) -> int:
    if schedule.warmup_steps is not None:
        return min(schedule.warmup_steps, total_steps)
    return int(math.ceil(schedule.warmup_ratio * total_steps))


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


def schedule_multiplier(schedule: ScheduleConfig, total_steps: int):
    """step → learning-rate factor, for a ScheduleConfig over `total_steps` steps."""
    warmup = warmup_steps(schedule, total_steps)
    return lambda step: lr_multiplier(step, total_steps, warmup, schedule.schedule, schedule.min_lr_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_multiplier(schedule, total_steps))
