"""Token losses of a causal LM on a batch, and one optimizer step of token-mean loss over a global batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmrefinery.data.collate import Batch
from lmrefinery.data.tokenize import IGNORE_INDEX
from lmrefinery.errors import TrainingDiverged
from lmrefinery.train.distributed import DistEnv, all_reduce_sum, gradient_sum_factor
from lmrefinery.train.precision import autocast


def example_loss_sums(model: nn.Module, batch: Batch, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the sum of next-token cross-entropies over its supervised tokens, and how many there are.

    Cross-entropy is computed in fp32 even under bf16 autocast (the softmax over a large vocabulary is where bf16
    loses the most).
    """
    with autocast(precision, batch.input_ids.device):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    targets = batch.labels[:, 1:]
    token_losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                   reduction="none")
    supervised = targets != IGNORE_INDEX
    return (token_losses * supervised).sum(dim=1), supervised.sum(dim=1)


def global_token_counts(micro_batches: list[Batch], env: DistEnv, device: torch.device) -> tuple[int, int]:
    """(supervised tokens, input tokens without padding) over the global batch."""
    local = torch.tensor([float(sum(b.supervised_tokens for b in micro_batches)),
                          float(sum(int(b.attention_mask.sum()) for b in micro_batches))],
                         dtype=torch.float64, device=device)
    supervised, inputs = all_reduce_sum(local, env).tolist()
    return int(supervised), int(inputs)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    supervised_tokens: int
    input_tokens: int


def _set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    # FSDP2 modules expose this; skipping the reduce-scatter on all but the last micro-batch saves communication.
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)


def accumulate_token_mean_gradients(model: nn.Module, micro_batches: list[Batch], env: DistEnv,
                                    precision: str) -> tuple[float, int, int]:
    """Backward of (sum of token losses over the global batch) / (supervised tokens in the global batch).

    Normalising by the global count, not per micro-batch, makes the gradient independent of how the global batch is
    split into micro-batches and ranks. Returns the global token-mean loss and the global token counts.
    """
    device = micro_batches[0].input_ids.device
    total_tokens, input_tokens = global_token_counts(micro_batches, env, device)
    scale = gradient_sum_factor(env) / max(total_tokens, 1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for index, batch in enumerate(micro_batches):
        _set_gradient_sync(model, index == len(micro_batches) - 1)
        sums, _ = example_loss_sums(model, batch, precision)
        (sums.sum() * scale).backward()
        loss_sum += sums.detach().sum().double()
    return float(all_reduce_sum(loss_sum, env).item()) / max(total_tokens, 1), total_tokens, input_tokens


def clip_gradients(model: nn.Module, max_norm: float | None) -> float:
    parameters = [p for p in model.parameters() if p.grad is not None]
    if not parameters:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm is not None else float("inf"),
                                          foreach=True)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def optimizer_step(model: nn.Module, optimizer, scheduler, micro_batches: list[Batch], env: DistEnv, precision: str,
                   max_grad_norm: float | None, step: int) -> StepResult:
    """One optimizer step; raises TrainingDiverged (before touching the weights) on a NaN/inf loss or gradient."""
    optimizer.zero_grad(set_to_none=True)
    loss, tokens, input_tokens = accumulate_token_mean_gradients(model, micro_batches, env, precision)
    grad_norm = clip_gradients(model, max_grad_norm)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"step {step}: loss {loss}, gradient norm {grad_norm}")
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return StepResult(loss, grad_norm, tokens, input_tokens)
