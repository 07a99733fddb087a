"""`lmrefinery calibrate`: choose the teacher temperature that minimises calibration error (trustworthy maximisation).

On a held-out cache, each response position is one prediction: the teacher's top-1 token, correct iff it is the true
next token. Its confidence under a temperature c is P_T(1) from the chosen transform over the k cached buckets. A grid
search (0.1 … 1.0 for the probability temperature, 0.25 … 3.0 for the logit temperature, extended upward while the
best is on the upper edge; then steps of 0.02 within ± one grid step of the best) minimises ECE (or NLL over k + 1
buckets, the tail as the last). Writes calibration.json and reliability diagrams before (raw full-vocabulary top-1 probability) and after.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from lmrefinery.config import CalibrateConfig, dump_config
from lmrefinery.data.tokenize import IGNORE_INDEX
from lmrefinery.distill.losses import teacher_distribution
from lmrefinery.evaluation.calibration import (brier_score, expected_calibration_error, negative_log_likelihood,
                                               reliability_diagram)
from lmrefinery.fileio import atomic_write_json, atomic_write_text
from lmrefinery.recipes.common import load_cache_with_data

log = logging.getLogger(__name__)
DEFAULT_GRIDS = {"prob_temperature": [round(0.1 * i, 1) for i in range(1, 11)],
                 "logit_temperature": [0.25 * i for i in range(1, 13)]}
MAX_EXTENSIONS = 4


def gather_predictions(cache, pool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All held-out positions: (logprobs [P, k], tail [P], index of the true token among the k, or k if outside)."""
    logprobs, tails, targets = [], [], []
    for index, example in enumerate(pool.examples):
        ids, example_logprobs, tail = cache.rows(index)
        labels = torch.tensor(example.labels[1:])
        truth = labels[labels != IGNORE_INDEX]
        hits = ids == truth.unsqueeze(-1)
        targets.append(torch.where(hits.any(-1), hits.float().argmax(-1), torch.full_like(truth, ids.shape[1])))
        logprobs.append(example_logprobs)
        tails.append(tail)
    return torch.cat(logprobs), torch.cat(tails), torch.cat(targets)


def score(logprobs, tails, targets, transform: str | None, temperature: float, n_bins: int) -> dict:
    k = logprobs.shape[1]
    correct = (targets == 0).numpy().astype(np.float64)
    if transform is None:  # the teacher as it is: full-vocabulary probabilities
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
            "_confidence": confidence, "_correct": correct}


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def run(config: CalibrateConfig, resume: bool = False) -> Path:
    cache, _, pool, _ = load_cache_with_data(config.cache)
    logprobs, tails, targets = gather_predictions(cache, pool)
    objective = config.objective

    def evaluate(c: float) -> dict:
        return score(logprobs, tails, targets, config.transform, round(c, 4), config.n_bins)

    grid = sorted(config.grid or DEFAULT_GRIDS[config.transform])
    coarse_step = float(min(np.diff(grid))) if len(grid) > 1 else 0.1
    curve = {round(c, 4): evaluate(c) for c in grid}
    best = min(curve.values(), key=lambda r: r[objective])["temperature"]
    for _ in range(MAX_EXTENSIONS):  # a best value on the upper edge means the grid stopped too early
        if best < max(curve) - 1e-9:
            break
        top = max(curve)
        curve.update({round(c, 4): evaluate(c) for c in np.arange(top + coarse_step, 2 * top + 1e-9, coarse_step)})
        best = min(curve.values(), key=lambda r: r[objective])["temperature"]
    for c in np.arange(best - coarse_step, best + coarse_step + 1e-9, config.fine_step):
        if c > 1e-3 and round(float(c), 4) not in curve:
            curve[round(float(c), 4)] = evaluate(float(c))
    chosen = min(curve.values(), key=lambda r: (r[objective], r["temperature"]))
    before = score(logprobs, tails, targets, None, 1.0, config.n_bins)
    at_one = curve.get(1.0) or evaluate(1.0)

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    reliability_diagram(before["_confidence"], before["_correct"], output_dir / "plots" / "reliability-before.png",
                        config.n_bins, "Teacher as is (full-vocabulary top-1 probability)")
    reliability_diagram(chosen["_confidence"], chosen["_correct"], output_dir / "plots" / "reliability-after.png",
                        config.n_bins, f"Teacher after {config.transform}, c = {chosen['temperature']:g}")
    atomic_write_json(output_dir / "calibration.json", {
        "transform": config.transform, "objective": objective, "temperature": chosen["temperature"],
        "ece_before": before["ece"], "ece_after": chosen["ece"], "ece_at_temperature_1": at_one["ece"],
        "before": _public(before), "after": _public(chosen), "at_temperature_1": _public(at_one),
        "positions": int(targets.numel()), "k": cache.k, "cache": str(config.cache),
        "curve": [_public(curve[c]) for c in sorted(curve)]})
    atomic_write_text(output_dir / "config.yaml", dump_config(config))
    log.info("temperature %.2f (%s): ECE %.4f → %.4f (%.4f at c = 1), %d positions; wrote %s", chosen["temperature"],
             config.transform, before["ece"], chosen["ece"], at_one["ece"], targets.numel(),
             output_dir / "calibration.json")
    return output_dir
