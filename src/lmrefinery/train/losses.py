"""Token losses of a causal LM on a batch, and one optimizer step of token-mean loss over a global batch."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmrefinery.data.collate import Batch
from lmrefinery.data.tokenize import IGNORE_INDEX
from lmrefinery.errors import TrainingDiverged
from lmrefinery.models.head import logits_at
from lmrefinery.train.distributed import DistEnv, all_reduce_sum, gradient_sum_factor
from lmrefinery.train.precision import autocast


@dataclass
class ResponseLogits:
    """The logits of the positions whose next token is supervised, in row-major order over the batch."""

    logits: torch.Tensor   # [P, V]
    targets: torch.Tensor  # [P] the true next tokens
    mask: torch.Tensor     # [B, T - 1] bool: which (example, position) each row is

    def example_sums(self, values: torch.Tensor) -> torch.Tensor:
        """Per-position values [P] summed back into their examples: [B]."""
        return example_sums(values, self.mask)

    def counts(self) -> torch.Tensor:
        return self.mask.sum(dim=1)


def example_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scatter per-position values (one per True of `mask` [B, T], row-major) into per-example sums [B]."""
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    sums = torch.zeros(mask.shape[0], dtype=values.dtype, device=values.device)
    return sums.index_add(0, rows.to(values.device), values)


def response_logits(model: nn.Module, batch: Batch, precision: str) -> ResponseLogits:
    """Logits only where the next token is supervised (the LM head is applied there only: models/head.py)."""
    targets = batch.labels[:, 1:]
    mask = targets != IGNORE_INDEX
    positions = F.pad(mask, (0, 1), value=False)  # position t predicts token t + 1
    with autocast(precision, batch.input_ids.device):
        logits = logits_at(model, batch.hidden_positions(positions), **batch.model_inputs())
    return ResponseLogits(logits, targets.to(logits.device)[mask.to(targets.device)], mask.to(logits.device))


def cross_entropy_sums(response: ResponseLogits, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the sum of next-token cross-entropies over its supervised tokens, and how many there are.

    Cross-entropy is computed in fp32 even under bf16 autocast (the softmax over a large vocabulary is where bf16
    loses the most). With label smoothing ε each token's loss is (1 − ε)·CE + ε·mean over the vocabulary of −log p,
    the convention of `torch.nn.functional.cross_entropy`.
    """
    token_losses = F.cross_entropy(response.logits.float(), response.targets, reduction="none",
                                   label_smoothing=label_smoothing)
    return response.example_sums(token_losses), response.counts()


def example_loss_sums(model: nn.Module, batch: Batch, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    return cross_entropy_sums(response_logits(model, batch, precision))


def label_smoothed_loss_sums(label_smoothing: float) -> "LossSumsFn":
    def loss_sums(model: nn.Module, batch: Batch, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
        return cross_entropy_sums(response_logits(model, batch, precision), label_smoothing)
    return loss_sums


def global_token_counts(micro_batches: list[Batch], env: DistEnv, device: torch.device) -> tuple[int, int, int, int]:
    """(supervised tokens, input tokens without padding, examples, padding positions computed) over the global
    batch."""
    local = torch.tensor([float(sum(b.supervised_tokens for b in micro_batches)),
                          float(sum(int(b.attention_mask.sum()) for b in micro_batches)),
                          float(sum(b.input_ids.shape[0] for b in micro_batches)),
                          float(sum(b.forward_positions for b in micro_batches))],
                         dtype=torch.float64, device=device)
    supervised, inputs, examples, computed = all_reduce_sum(local, env).tolist()
    return int(supervised), int(inputs), int(examples), int(computed - inputs)


# (model, batch, precision) → per-example loss sums [B], supervised token counts [B] and, optionally, a third item:
# {name: sum over the batch's supervised positions} of diagnostics (reported per token, e.g. the student's top-k mass)
LossSumsFn = Callable[[nn.Module, Batch, str], tuple]


class Accumulated(NamedTuple):
    loss: float              # the global normalised loss
    supervised_tokens: int
    input_tokens: int
    stats: dict[str, float]  # diagnostics, per supervised token over the global batch
    padded_tokens: int = 0   # padding positions the forwards computed


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    supervised_tokens: int
    input_tokens: int
    stats: dict[str, float] = field(default_factory=dict)
    padded_tokens: int = 0


def _set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    # FSDP2 modules expose this; skipping the reduce-scatter on all but the last micro-batch saves communication.
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)


def accumulate_token_mean_gradients(model: nn.Module, micro_batches: list[Batch], env: DistEnv, precision: str,
                                    loss_sums_fn: LossSumsFn = example_loss_sums,
                                    normalize_by: str = "tokens") -> Accumulated:
    """Backward of (sum of token losses over the global batch) / (supervised tokens in the global batch).

    Normalising by the global count, not per micro-batch, makes the gradient independent of how the global batch is
    split into micro-batches and ranks. `normalize_by="examples"` divides by the global number of examples instead
    (a per-sequence sum). Returns the global normalised loss, the global token counts and the loss function's
    diagnostics averaged over the global batch's supervised tokens.
    """
    if normalize_by not in ("tokens", "examples"):
        raise ValueError(f"normalize_by must be 'tokens' or 'examples', got {normalize_by!r}")
    device = micro_batches[0].input_ids.device
    total_tokens, input_tokens, examples, padded_tokens = global_token_counts(micro_batches, env, device)
    normaliser = max(total_tokens if normalize_by == "tokens" else examples, 1)
    scale = gradient_sum_factor(env) / normaliser
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    stat_sums: dict[str, torch.Tensor] = {}
    for index, batch in enumerate(micro_batches):
        _set_gradient_sync(model, index == len(micro_batches) - 1)
        sums, _, *extra = loss_sums_fn(model, batch, precision)
        (sums.sum() * scale).backward()
        loss_sum += sums.detach().sum().double()
        for name, value in (extra[0] if extra else {}).items():
            stat_sums[name] = stat_sums.get(name, 0.0) + value.detach().double().to(device)
    totals = all_reduce_sum(torch.stack([loss_sum, *stat_sums.values()]), env).tolist()
    stats = {name: value / max(total_tokens, 1) for name, value in zip(stat_sums, totals[1:])}
    return Accumulated(totals[0] / normaliser, total_tokens, input_tokens, stats, padded_tokens)


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
                   max_grad_norm: float | None, step: int, loss_sums_fn: LossSumsFn = example_loss_sums,
                   normalize_by: str = "tokens") -> StepResult:
    """One optimizer step; raises TrainingDiverged (before touching the weights) on a NaN/inf loss or gradient."""
    optimizer.zero_grad(set_to_none=True)
    loss, tokens, input_tokens, stats, padded_tokens = accumulate_token_mean_gradients(
        model, micro_batches, env, precision, loss_sums_fn, normalize_by)
    grad_norm = clip_gradients(model, max_grad_norm)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"step {step}: loss {loss}, gradient norm {grad_norm}")
    guarded_step(optimizer, step)
    if scheduler is not None:
        scheduler.step()
    return StepResult(loss, grad_norm, tokens, input_tokens, stats, padded_tokens)


def guarded_step(optimizer: torch.optim.Optimizer, step: int) -> None:
    """optimizer.step(), with a learning rate too large for the arithmetic (e.g. lr = 1e38: AdamW's step size
    overflows fp32) reported as the divergence it is."""
    try:
        optimizer.step()
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        raise TrainingDiverged(f"step {step}: the optimizer step overflowed ({str(exc).splitlines()[0]}); the "
                               f"learning rate is too large") from None
