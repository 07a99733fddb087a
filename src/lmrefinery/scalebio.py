"""ScaleBiO — first-order bilevel data reweighting (docs/methods/scalebio.md), model-agnostic.

Two copies of a model: u (lower, tracks the optimum of the weighted training loss) and w (upper, the iterate that
should do well on the validation set), plus logits λ with source weights p = softmax(λ). One step takes all three
gradients at the same point (u_t, w_t, λ_t), then steps each variable:

    L2_B(x)  = Σ_{e∈B} p_src(e) / N_src(e) · ℓ(x; e)        N_i = examples of source i in the *global* batch
    g_u      = ∇_u L2_B(u)
    g_w      = ∇_w [ L1_Bv(w) + α · L2_B(w) ]
    g_λ      = α · J(p) · (ℓ̄(w) − ℓ̄(u)),   J = diag(p) − p pᵀ,   ℓ̄_i(x) = mean loss of source i in B under x

g_λ is computed in closed form from per-source loss sums — when every source is in the batch, exactly what autograd
through the softmax gives — and needs no graph. A source absent from the batch has no ℓ̄_i: its discrepancy is taken
as the p-weighted mean of the present ones, so its logit gets exactly zero gradient (a batch that did not see a
source says nothing about it; Δ_i = 0 instead would move it by −α·p_i·Σ p_jΔ_j) and each present source's component
is α·p_k·(Δ_k − that mean) (docs/methods/scalebio.md §3.3).

Batches may be split into micro-batches (pass a list): counts and sums run over the whole global batch before any
normalisation, so a step does not depend on the split. For the validation loss pass `val_weight_fn` (each
micro-batch's size, e.g. its token count); without it every validation micro-batch weighs the same. Under data
parallelism pass `all_reduce` (sums a tensor over processes) and `gradient_sum_factor` (the number of processes when
the data-parallel wrapper averages gradients).

Optimizers come from the project's builder (AdamW or SGD, no weight decay on biases and norms, none at all on λ).
`max_grad_norm` clips u at max_norm and w at α·max_norm — the same units, since only w's loss is scaled by α.
Non-finite values raise `TrainingDiverged` before any variable moves.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from scipy import stats
from torch import nn

from lmrefinery.errors import TrainingDiverged
from lmrefinery.train.distributed import local_shard
from lmrefinery.train.losses import clip_gradients, guarded_step
from lmrefinery.train.optim import build_optimizer, lr_multiplier

TrainLossFn = Callable[[nn.Module, object], tuple[torch.Tensor, torch.Tensor]]
ValLossFn = Callable[[nn.Module, object], torch.Tensor]


def _default_source_ids(batch) -> torch.Tensor:
    if isinstance(batch, dict):
        return batch["source_ids"]
    return batch.source_ids


def weight_gradient(weights: torch.Tensor, lower_means: torch.Tensor, upper_means: torch.Tensor,
                    present: torch.Tensor, alpha: float) -> torch.Tensor:
    """α · J(p) · (ℓ̄(w) − ℓ̄(u)) with absent sources' discrepancy set to the p-weighted mean of the present ones."""
    delta = torch.where(present, upper_means - lower_means, torch.zeros_like(upper_means))
    if present.any():
        mean = (weights * delta * present).sum() / (weights * present).sum()
        delta = torch.where(present, delta, mean)
    return alpha * weights * (delta - (weights * delta).sum())


SIGNAL_LEVEL = 0.05  # family-wise false-alarm rate of the settle guard over the K sources (Bonferroni)
SIGNAL_BLOCKS = 10   # batch means: the window's steps are averaged in up to this many consecutive blocks


class GradientSignal(NamedTuple):
    snr: torch.Tensor  # [K] |mean| / standard error of each source's λ-gradient
    mean: torch.Tensor  # [K] the mean λ-gradient (negative: λ descends, so the source's weight is pushed up)
    dof: int            # degrees of freedom of the standard error (blocks − 1)


def gradient_signal_to_noise(gradients: torch.Tensor, blocks: int = SIGNAL_BLOCKS) -> GradientSignal:
    """Per source, |mean| / standard error of the λ-gradients of the last N steps ([N, K]).

    Successive λ-gradients are correlated (LISA keeps its blocks for several steps, Adam's moments and the weights
    move slowly), so the standard error comes from batch means: the N steps cut into `blocks` consecutive blocks
    (of N // blocks steps; the oldest remainder dropped), whose means are close to independent. With N ≤ blocks each
    block is one step (the one-sample t statistic). A source pushed the same way step after step has a large value;
    batch noise gives a t-distributed one. Fewer than 2 steps: nothing to estimate (NaN)."""
    gradients = gradients.double()
    steps, sources = gradients.shape
    if steps < 2:
        nan = torch.full((sources,), float("nan"), dtype=torch.float64)
        return GradientSignal(nan, nan.clone(), 0)
    length = max(1, steps // blocks)
    count = steps // length
    means = gradients[steps - count * length:].reshape(count, length, sources).mean(dim=1)
    error = means.std(dim=0, unbiased=True) / math.sqrt(count)
    mean = means.mean(dim=0)
    return GradientSignal(mean.abs() / error.clamp(min=1e-30), mean, count - 1)


def signal_threshold(sources: int, dof: int, level: float = SIGNAL_LEVEL) -> float:
    """The t quantile a source's signal-to-noise must reach so that pure noise passes for any of `sources` with
    probability ≤ `level` (two-sided, Bonferroni)."""
    if dof < 1:
        return float("nan")
    return float(stats.t.ppf(1 - level / (2 * sources), dof))


def weights_settled(signal: GradientSignal, weights: torch.Tensor, level: float = SIGNAL_LEVEL) -> bool:
    """The weights carry a signal when the source that holds the most weight is pushed up consistently (its
    λ-gradient negative, with a signal-to-noise above the K-corrected threshold): then its lead comes from the data.
    Some other source being pushed consistently is not enough — one noise source driven steadily down says nothing
    about whether the top of the ranking is more than the order the batches happened to arrive in."""
    return _top_pushed_up(signal, int(torch.argmax(weights)), signal_threshold(len(weights), signal.dof, level))


def _top_pushed_up(signal: GradientSignal, top: int, threshold: float) -> bool:
    """λ descends, so a negative mean λ-gradient pushes the source's weight up."""
    return bool(signal.mean[top] < 0 and signal.snr[top] >= threshold)


PLATEAU_SHARE = 0.1  # the weights have stopped when their last window moved them less than this share of the way before


class SettleVerdict(NamedTuple):
    """The settle guard's reading of a run (`settle_verdict`)."""
    window: int            # steps in the last window (the last quarter of the run, at least 2)
    signal: GradientSignal  # each source's λ-gradient signal-to-noise over that window
    threshold: float        # what the top source's signal-to-noise must reach (K-Bonferroni)
    top: int                # the source holding the most weight at the end
    pushed: bool            # the top source pushed up consistently over the last window
    moved_window: float     # total variation between the weights at the window's start and at the end
    moved_before: float     # total variation between the starting weights and those at the window's start
    earlier_push: bool      # the top source pushed up consistently over one of the (up to 3) windows before it

    @property
    def plateau(self) -> bool:
        return self.earlier_push and self.moved_window < PLATEAU_SHARE * self.moved_before

    @property
    def settled(self) -> bool:
        return self.pushed or self.plateau


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(0.5 * (a.double() - b.double()).abs().sum())


def _pushed_up(gradients: torch.Tensor, top: int, sources: int, level: float) -> tuple[GradientSignal, float, bool]:
    signal = gradient_signal_to_noise(gradients)
    threshold = signal_threshold(sources, signal.dof, level)
    return signal, threshold, _top_pushed_up(signal, top, threshold)


def settle_verdict(gradients: torch.Tensor, trajectory: torch.Tensor, level: float = SIGNAL_LEVEL) -> SettleVerdict:
    """Whether a run's weights carry a signal, from its λ-gradients ([N, K], one row per step) and weights
    ([N + 1, K]: before the first step, then after each).

    Settled either way the top source's lead can come from the data:
    - **pushed**: over the last window (the last quarter, ≥ 2 steps) the top source's λ-gradient is negative with a
      signal-to-noise above the K-corrected threshold (`weights_settled`);
    - **plateau**: at a fixed point of λ nothing is pushed any more, so the first rule warns there as it does under
      noise. A plateau is told from noise by two things together: the top source *was* pushed up consistently over
      one of the three windows before the last (Bonferroni over the sources and those windows, so pure noise passes
      with probability ≤ `level`), and the weights have since stopped — the last window moved them (total variation)
      less than `PLATEAU_SHARE` of their movement up to it. Under noise Adam's normalised steps make λ a random walk
      whose last quarter moves it about half as far as the rest of the run; after a push that reached a fixed point
      the last window moves it little."""
    gradients, trajectory = gradients.double(), trajectory.double()
    steps, sources = gradients.shape
    window = max(2, steps // 4)
    top = int(torch.argmax(trajectory[-1]))
    signal, threshold, pushed = _pushed_up(gradients[steps - window:], top, sources, level)
    earlier = [gradients[steps - (j + 1) * window: steps - j * window] for j in range(1, 4)
               if steps - (j + 1) * window >= 0]
    earlier_push = any(_pushed_up(chunk, top, sources * len(earlier), level)[2] for chunk in earlier)
    start = max(0, steps - window)
    return SettleVerdict(window=min(window, steps), signal=signal, threshold=threshold, top=top, pushed=pushed,
                         moved_window=total_variation(trajectory[start], trajectory[-1]),
                         moved_before=total_variation(trajectory[0], trajectory[start]), earlier_push=earlier_push)


def _local_gradients(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else local_shard(p.grad).detach().double().clone() for p in model.parameters()]


class ScaleBiO:
    """ScaleBiO on any nn.Module: `model` is w (a copy becomes u unless `lower_model` is given), `num_sources` the
    number of data sources. `train_loss_fn(model, batch) -> (per-example losses, source ids)` and
    `val_loss_fn(model, batch) -> scalar` define the two levels; `step(train_batch, val_batch)` takes one step of all
    three variables and returns its metrics; `weights` are the current source weights softmax(λ).
    Learning rates, α/τ continuation, schedule and clipping follow docs/methods/scalebio.md (see the module
    docstring)."""

    def __init__(self, model: nn.Module, num_sources: int, train_loss_fn: TrainLossFn, val_loss_fn: ValLossFn, *,
                 alpha: float = 100.0, tau: float = 1.0, rounds: int = 1,
                 lr_lower: float = 1e-5, lr_upper: float = 1e-5, lr_weights: float = 1e-2,
                 optimizer: str = "adamw", weight_decay: float = 5e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, total_steps: int | None = None, schedule: str = "cosine",
                 warmup_ratio: float = 0.03, warmup_steps: int | None = None, min_lr_ratio: float = 0.0,
                 max_grad_norm: float | None = None,
                 max_weight_grad_norm: float | None = None, lower_model: nn.Module | None = None,
                 source_ids_fn: Callable[[object], torch.Tensor] = _default_source_ids,
                 val_weight_fn: Callable[[object], float] | None = None,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 gradient_sum_factor: float = 1.0, log_alignment: bool = False):
        if num_sources < 1:
            raise ValueError("num_sources must be at least 1")
        if total_steps is not None and rounds > total_steps:
            raise ValueError(f"rounds={rounds} cannot exceed total_steps={total_steps}")
        self.upper_model = model
        self.lower_model = lower_model if lower_model is not None else copy.deepcopy(model)
        self.num_sources = num_sources
        self.train_loss_fn, self.val_loss_fn = train_loss_fn, val_loss_fn
        self.alpha, self.tau, self.rounds = alpha, tau, rounds
        self.total_steps, self.schedule, self.min_lr_ratio = total_steps, schedule, min_lr_ratio
        if not total_steps:
            self.warmup = 0
        else:
            self.warmup = min(warmup_steps, total_steps) if warmup_steps is not None else math.ceil(
                warmup_ratio * total_steps)
        self.max_grad_norm, self.max_weight_grad_norm = max_grad_norm, max_weight_grad_norm
        self.source_ids_fn, self.val_weight_fn = source_ids_fn, val_weight_fn
        self.all_reduce = all_reduce or (lambda tensor: tensor)
        self.gradient_sum_factor = gradient_sum_factor
        self.log_alignment = log_alignment
        device = next(model.parameters()).device
        self.logits = nn.Parameter(torch.zeros(num_sources, dtype=torch.float64, device=device))
        # u and w follow the project's weight-decay policy (none on biases and norms); λ never has weight decay.
        settings = {"kind": optimizer, "betas": betas, "eps": eps}
        self.lower_optimizer = build_optimizer(self.lower_model, lr=lr_lower, weight_decay=weight_decay, **settings)
        self.upper_optimizer = build_optimizer(self.upper_model, lr=lr_upper, weight_decay=weight_decay, **settings)
        self.weights_optimizer = build_optimizer([self.logits], lr=lr_weights, weight_decay=0.0, **settings)
        self.base_lrs = {"lower": lr_lower, "upper": lr_upper, "weights": lr_weights}
        self.steps_done = 0

    # ---- schedule -------------------------------------------------------------------------------------------------
    @property
    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits.detach(), dim=0)

    def round_index(self, step: int) -> int:
        if not self.total_steps or self.rounds <= 1:
            return 0
        return min(self.rounds - 1, step * self.rounds // self.total_steps)

    def current_alpha(self, step: int | None = None) -> float:
        return self.alpha * self.tau ** self.round_index(self.steps_done if step is None else step)

    def _set_learning_rates(self, step: int) -> dict[str, float]:
        shape = (lr_multiplier(step, self.total_steps, self.warmup, self.schedule, self.min_lr_ratio)
                 if self.total_steps else 1.0)
        scale = shape * self.tau ** (-self.round_index(step))
        rates = {}
        for name, optimizer in (("lower", self.lower_optimizer), ("upper", self.upper_optimizer),
                                ("weights", self.weights_optimizer)):
            rates[name] = self.base_lrs[name] * scale
            for group in optimizer.param_groups:
                group["lr"] = rates[name]
        return rates

    # ---- one step -------------------------------------------------------------------------------------------------
    def _source_counts(self, micro_batches: Sequence) -> torch.Tensor:
        counts = torch.zeros(self.num_sources, dtype=torch.float64, device=self.logits.device)
        for batch in micro_batches:
            ids = self.source_ids_fn(batch).to(counts.device)
            counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
        return self.all_reduce(counts)

    def _weighted_train_backward(self, model: nn.Module, micro_batches: Sequence, example_weights: torch.Tensor,
                                 scale: float) -> torch.Tensor:
        """Backward of scale · Σ_e p_src/N_src · ℓ(e); returns the per-source loss sums (detached, global)."""
        sums = torch.zeros(self.num_sources, dtype=torch.float64, device=self.logits.device)
        for batch in micro_batches:
            losses, source_ids = self.train_loss_fn(model, batch)
            source_ids = source_ids.to(example_weights.device)
            weight = example_weights[source_ids].to(losses.dtype).to(losses.device)
            (scale * self.gradient_sum_factor * (weight * losses).sum()).backward()
            sums.index_add_(0, source_ids, losses.detach().double().to(sums.device))
        return self.all_reduce(sums)

    def _validation_backward(self, model: nn.Module, micro_batches: Sequence) -> float:
        sizes = torch.tensor([float(self.val_weight_fn(b)) if self.val_weight_fn else 1.0 for b in micro_batches],
                             dtype=torch.float64, device=self.logits.device)
        total = float(self.all_reduce(sizes.sum().clone()))
        value = torch.zeros((), dtype=torch.float64, device=self.logits.device)
        for batch, size in zip(micro_batches, sizes.tolist()):
            loss = self.val_loss_fn(model, batch)
            (loss * (size / total) * self.gradient_sum_factor).backward()
            value += loss.detach().double() * size / total
        return float(self.all_reduce(value))

    def step(self, train_batch, val_batch) -> dict[str, float]:
        """One ScaleBiO step; `train_batch` / `val_batch` are a batch or a list of micro-batches."""
        train_micro = list(train_batch) if isinstance(train_batch, (list, tuple)) else [train_batch]
        val_micro = list(val_batch) if isinstance(val_batch, (list, tuple)) else [val_batch]
        step = self.steps_done
        rates = self._set_learning_rates(step)
        alpha = self.current_alpha(step)
        for optimizer in (self.lower_optimizer, self.upper_optimizer, self.weights_optimizer):
            optimizer.zero_grad(set_to_none=True)

        weights = self.weights
        counts = self._source_counts(train_micro)
        present = counts > 0
        per_example = torch.where(present, weights / counts.clamp(min=1), torch.zeros_like(weights))

        lower_sums = self._weighted_train_backward(self.lower_model, train_micro, per_example, 1.0)
        upper_sums = self._weighted_train_backward(self.upper_model, train_micro, per_example, alpha)
        train_gradients = _local_gradients(self.upper_model) if self.log_alignment else None
        val_loss = self._validation_backward(self.upper_model, val_micro)
        alignment = self._alignment(train_gradients) if self.log_alignment else None

        lower_means = lower_sums / counts.clamp(min=1)
        upper_means = upper_sums / counts.clamp(min=1)
        self.logits.grad = weight_gradient(weights, lower_means, upper_means, present, alpha)
        weight_grad = self.logits.grad.detach().cpu().tolist()  # before clipping: the signal, not the step
        weight_grad_norm = float(self.logits.grad.norm())
        if self.max_weight_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([self.logits], self.max_weight_grad_norm)
        # w's loss carries α (u's does not), so the same threshold in the same units is α·max_norm for w: one
        # threshold for both would clip only w.
        lower_norm = clip_gradients(self.lower_model, self.max_grad_norm)
        upper_norm = clip_gradients(self.upper_model, alpha * self.max_grad_norm if self.max_grad_norm else None)

        l2_lower = float((weights * lower_means * present).sum())
        l2_upper = float((weights * upper_means * present).sum())
        metrics = {"val_loss_upper": val_loss, "train_loss_lower": l2_lower, "train_loss_upper": l2_upper,
                   "gap": l2_upper - l2_lower, "alpha": alpha, "grad_norm_lower": lower_norm,
                   "grad_norm_upper": upper_norm, "grad_norm_weights": weight_grad_norm,
                   "lr_lower": rates["lower"], "lr_upper": rates["upper"], "lr_weights": rates["weights"]}
        if not all(math.isfinite(v) for v in metrics.values()) or not all(math.isfinite(g) for g in weight_grad):
            for optimizer in (self.lower_optimizer, self.upper_optimizer, self.weights_optimizer):
                optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"ScaleBiO step {step + 1}: non-finite values {metrics}")
        previous_logits = self.logits.detach().clone()
        for optimizer in (self.lower_optimizer, self.upper_optimizer, self.weights_optimizer):
            guarded_step(optimizer, step + 1)
        if not torch.isfinite(self.logits).all():  # λ's own step overflowed: keep the weights it had
            with torch.no_grad():
                self.logits.copy_(previous_logits)
            raise TrainingDiverged(f"ScaleBiO step {step + 1}: the source logits λ became non-finite (learning rate "
                                   f"{rates['weights']:g}); the weights are those before this step")
        self.steps_done += 1
        return metrics | {"weight_gradient": weight_grad} | (
            {"alignment": alignment} if self.log_alignment else {})

    def _alignment(self, train_gradients: list) -> float | None:
        """cos(w − u, −∇L1(w)) over the parameters w has gradients for (the LISA-active ones): ∇L1 is w's gradient
        after the validation backward minus what the weighted training backward had put there. When w − u points
        along −∇L1, ℓ_k(w) − ℓ_k(u) ≈ −η ∇ℓ_k·∇L1 and the λ-gradient is an influence estimate; None while w = u."""
        sums = torch.zeros(3, dtype=torch.float64, device=self.logits.device)
        pairs = zip(self.upper_model.parameters(), self.lower_model.parameters(), train_gradients)
        for upper, lower, before in pairs:
            if upper.grad is None:
                continue
            validation = local_shard(upper.grad).double() - (0.0 if before is None else before)
            gap = (local_shard(upper) - local_shard(lower)).detach().double()
            sums += torch.stack([-(gap * validation).sum(), (gap * gap).sum(),
                                 (validation * validation).sum()]).to(sums.device)
        inner, gap_norm2, gradient_norm2 = self.all_reduce(sums).tolist()
        if gap_norm2 == 0.0 or gradient_norm2 == 0.0:
            return None
        return inner / math.sqrt(gap_norm2 * gradient_norm2)

    # ---- state ----------------------------------------------------------------------------------------------------
    def state_dict(self, include_models: bool = True) -> dict:
        state = {"logits": self.logits.detach().cpu().clone(), "steps_done": self.steps_done,
                 "weights_optimizer": self.weights_optimizer.state_dict()}
        if include_models:
            state.update(lower_model=self.lower_model.state_dict(), upper_model=self.upper_model.state_dict(),
                         lower_optimizer=self.lower_optimizer.state_dict(),
                         upper_optimizer=self.upper_optimizer.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.logits.copy_(state["logits"].to(self.logits.device))
        self.steps_done = int(state["steps_done"])
        self.weights_optimizer.load_state_dict(state["weights_optimizer"])
        if "lower_model" in state:
            self.lower_model.load_state_dict(state["lower_model"])
            self.upper_model.load_state_dict(state["upper_model"])
            self.lower_optimizer.load_state_dict(state["lower_optimizer"])
            self.upper_optimizer.load_state_dict(state["upper_optimizer"])
