"""FIRST's trustworthy maximisation (docs/methods/first.md §4): choose the teacher temperature on held-out data.

Each held-out response position is one prediction: the teacher's top-1 token, correct iff it is the true next token.
Its confidence under a temperature c is P_T(1) from the chosen transform over the k cached buckets. A grid search
(0.1 … 1.0 for the probability temperature, 0.25 … 3.0 for the logit temperature, extended upward while the best is
on the upper edge; then steps of `fine_step` within ± one grid step of the best) minimises ECE, or NLL over k + 1
buckets (the tail as the last).

A search that minimises the metric it then reports is optimistic on its own items: `cross_validated_search` gives the
out-of-sample figure — examples split into folds, each fold scored at the temperature searched on the others.
"""

from __future__ import annotations

import numpy as np
import torch

from lmrefinery.data.tokenize import IGNORE_INDEX
from lmrefinery.distill.losses import teacher_distribution
from lmrefinery.evaluation.calibration import brier_score, expected_calibration_error, negative_log_likelihood

DEFAULT_GRIDS = {"prob_temperature": [round(0.1 * i, 1) for i in range(1, 11)],
                 "logit_temperature": [0.25 * i for i in range(1, 13)]}
MAX_EXTENSIONS = 4


def gather_predictions(cache, examples, positions: str = "all") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Held-out positions — every response position, or with `positions="answer"` the first of each example — as
    (logprobs [P, k], tail [P], index of the true token among the k, or k if outside)."""
    if positions not in ("all", "answer"):
        raise ValueError(f"positions must be 'all' or 'answer', got {positions!r}")
    logprobs, tails, targets = [], [], []
    for index, example in enumerate(examples):
        ids, example_logprobs, tail = cache.rows(index)
        labels = torch.tensor(example.labels[1:])
        truth = labels[labels != IGNORE_INDEX]
        if positions == "answer":
            ids, example_logprobs, tail, truth = ids[:1], example_logprobs[:1], tail[:1], truth[:1]
        hits = ids == truth.unsqueeze(-1)
        targets.append(torch.where(hits.any(-1), hits.float().argmax(-1), torch.full_like(truth, ids.shape[1])))
        logprobs.append(example_logprobs)
        tails.append(tail)
    return torch.cat(logprobs), torch.cat(tails), torch.cat(targets)


def prediction_groups(examples, positions: str = "all") -> torch.Tensor:
    """The example each held-out position of `gather_predictions` belongs to ([P]), so that folds keep an example's
    positions together."""
    counts = [1 if positions == "answer" else sum(label != IGNORE_INDEX for label in example.labels[1:])
              for example in examples]
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))


def cross_validated_search(logprobs: torch.Tensor, tails: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor,
                           *, folds: int = 5, seed: int = 0, **search) -> dict | None:
    """The temperature search's out-of-sample ECE and NLL: examples (`groups`) are split at random into `folds`
    folds; each fold's positions are scored at the temperature searched (`search_temperature(**search)`) on the
    other folds, and the metrics are computed over all positions pooled. None when there are fewer examples than 2."""
    examples = groups.unique()
    folds = min(folds, len(examples))
    if folds < 2:
        return None
    order = np.random.default_rng(seed).permutation(len(examples))
    fold_of_example = torch.empty(int(examples.max()) + 1, dtype=torch.long)
    fold_of_example[examples[torch.as_tensor(order)]] = torch.arange(len(examples)) % folds
    fold = fold_of_example[groups]
    n_bins = search.get("n_bins", 10)
    confidence = np.empty(targets.numel())
    gold = np.empty(targets.numel())
    temperatures = []
    for held_out in range(folds):
        test = (fold == held_out)
        chosen, _ = search_temperature(logprobs[~test], tails[~test], targets[~test], **search)
        scored = score_temperature(logprobs[test], tails[test], targets[test], search.get("transform",
                                   "prob_temperature"), chosen["temperature"], n_bins)
        confidence[test.numpy()] = np.asarray(scored["_confidence"])
        gold[test.numpy()] = np.asarray(scored["_gold"])
        temperatures.append(chosen["temperature"])
    correct = (targets == 0).numpy().astype(np.float64)
    return {"folds": folds, "temperatures": temperatures,
            "ece": expected_calibration_error(confidence, correct, n_bins), "nll": negative_log_likelihood(gold)}


def score_temperature(logprobs: torch.Tensor, tails: torch.Tensor, targets: torch.Tensor, transform: str | None,
                      temperature: float, n_bins: int = 10) -> dict:
    """ECE, NLL, Brier, accuracy of the teacher under one temperature (`transform=None`: the teacher as it is, its
    full-vocabulary probabilities). Keys starting with '_' hold the per-position confidences and correctness."""
    k = logprobs.shape[1]
    correct = (targets == 0).numpy().astype(np.float64)
    if transform is None:
        buckets = torch.cat([logprobs.exp(), tails.exp().unsqueeze(-1)], dim=-1)
        confidence = logprobs[:, 0].exp()
    else:
        buckets = teacher_distribution(logprobs, transform=transform, temperature=temperature, other_bucket=True,
                                       tail_logmass=tails)
        confidence = teacher_distribution(logprobs, transform=transform, temperature=temperature)[:, 0]
    buckets = buckets / buckets.sum(-1, keepdim=True)
    gold = buckets.gather(-1, targets.clamp(max=k).unsqueeze(-1)).squeeze(-1)
    return {"temperature": temperature, "ece": expected_calibration_error(confidence, correct, n_bins),
            "nll": negative_log_likelihood(gold), "brier": brier_score(buckets, targets),
            "mean_confidence": float(confidence.mean()), "accuracy": float(correct.mean()),
            "_confidence": confidence, "_correct": correct, "_gold": gold}


def search_temperature(logprobs: torch.Tensor, tails: torch.Tensor, targets: torch.Tensor, *,
                       transform: str = "prob_temperature", objective: str = "ece", n_bins: int = 10,
                       grid: list[float] | None = None, fine_step: float = 0.02) -> tuple[dict, dict[float, dict]]:
    """FIRST's temperature search on held-out teacher predictions: `logprobs` [P, k] (the teacher's top-k
    log-probabilities, best first), `tails` [P] (log of the mass outside them), `targets` [P] (the index of the true
    token among the k, or k when it is outside). Returns the best temperature's scores (`temperature`, `ece`, `nll`,
    `brier`, `accuracy`, ...) and the whole searched curve {temperature: scores}; see the module docstring for the
    grid."""
    def evaluate(c: float) -> dict:
        return score_temperature(logprobs, tails, targets, transform, round(c, 4), n_bins)

    grid = sorted(grid or DEFAULT_GRIDS[transform])
    coarse_step = float(min(np.diff(grid))) if len(grid) > 1 else 0.1
    curve = {round(c, 4): evaluate(c) for c in grid}
    best = min(curve.values(), key=lambda r: r[objective])["temperature"]
    for _ in range(MAX_EXTENSIONS):  # a best value on the upper edge means the grid stopped too early
        if best < max(curve) - 1e-9:
            break
        top = max(curve)
        curve.update({round(c, 4): evaluate(c) for c in np.arange(top + coarse_step, 2 * top + 1e-9, coarse_step)})
        best = min(curve.values(), key=lambda r: r[objective])["temperature"]
    for c in np.arange(best - coarse_step, best + coarse_step + 1e-9, fine_step):
        if c > 1e-3 and round(float(c), 4) not in curve:
            curve[round(float(c), 4)] = evaluate(float(c))
    chosen = min(curve.values(), key=lambda r: (r[objective], r["temperature"]))
    return chosen, curve
