"""Calibration metrics (docs/methods/calibration.md): ECE, equal-mass (adaptive) ECE, MCE, Brier, NLL, selective
accuracy, the coverage–accuracy curve, reliability diagrams.

Binning convention (equal width, M bins): edges = linspace(0, 1, M + 1); bin m holds confidences c with
edges[m] < c ≤ edges[m+1], and the first bin also holds c = 0. So c = 1 falls in the last bin (no hidden extra bin)
and a confidence exactly on an inner edge belongs to the bin below it.
ECE = Σ_m (|B_m| / n) · |acc(B_m) − conf(B_m)|; empty bins contribute nothing. Inputs may be tensors or arrays.

Agreement with the libraries people cite (tests/test_calibration.py, random inputs, to 1e-6): ECE and MCE equal
torchmetrics' `multiclass_calibration_error` (norm 'l1' / 'max') and netcal's `ECE` / `MCE`; the equal-mass ECE
equals netcal's `ECE(equal_intervals=False)`. torchmetrics assigns a confidence of exactly 1.0 to an extra bin of
its own and netcal bins with half-open intervals the other way round, so on inputs with confidences exactly on a bin
edge (or at 1.0) the three can differ; on continuous inputs they do not.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lmrefinery.plots import plt, save_figure


def _array(values, dtype=np.float64) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype).reshape(-1)


def bin_indices(confidences, n_bins: int = 10) -> np.ndarray:
    """The equal-width bin of each confidence under the convention above."""
    confidences = _array(confidences)
    if confidences.size and (confidences.min() < 0 or confidences.max() > 1):
        raise ValueError("confidences must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges[1:-1], confidences, side="left"), 0, n_bins - 1)


def _bin_table(confidences, correct, bins: np.ndarray, n_bins: int):
    confidences, correct = _array(confidences), _array(correct)
    counts = np.bincount(bins, minlength=n_bins).astype(np.float64)
    confidence_sums = np.bincount(bins, weights=confidences, minlength=n_bins)
    correct_sums = np.bincount(bins, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts, confidence_sums / counts, correct_sums / counts


def expected_calibration_error(confidences, correct, n_bins: int = 10) -> float:
    """ECE with `n_bins` equal-width bins (the module docstring's convention): Σ_m |B_m|/n · |acc(B_m) − conf(B_m)|."""
    confidences = _array(confidences)
    if confidences.size == 0:
        return 0.0
    counts, mean_confidence, accuracy = _bin_table(confidences, correct, bin_indices(confidences, n_bins), n_bins)
    filled = counts > 0
    return float(np.sum(counts[filled] / confidences.size * np.abs(accuracy[filled] - mean_confidence[filled])))


def maximum_calibration_error(confidences, correct, n_bins: int = 10) -> float:
    """MCE: the largest |acc(B_m) − conf(B_m)| over the non-empty equal-width bins."""
    counts, mean_confidence, accuracy = _bin_table(confidences, correct, bin_indices(confidences, n_bins), n_bins)
    filled = counts > 0
    return float(np.max(np.abs(accuracy[filled] - mean_confidence[filled]))) if filled.any() else 0.0


def adaptive_calibration_error(confidences, correct, n_bins: int = 10) -> float:
    """ECE with equal-mass bins: items sorted by confidence and split into n_bins nearly equal groups."""
    confidences, correct = _array(confidences), _array(correct)
    if confidences.size == 0:
        return 0.0
    order = np.argsort(confidences, kind="stable")
    total = 0.0
    for group in np.array_split(order, min(n_bins, confidences.size)):
        total += group.size / confidences.size * abs(correct[group].mean() - confidences[group].mean())
    return float(total)


equal_mass_calibration_error = adaptive_calibration_error  # HELM's name for ECE with equal-mass bins


def selective_accuracy(confidences, correct, coverage: float) -> float:
    """Accuracy on the `coverage` fraction of items the model is most confident about (ties: the first in order)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    confidences, correct = _array(confidences), _array(correct)
    kept = max(1, int(np.ceil(coverage * confidences.size)))
    order = np.argsort(-confidences, kind="stable")
    return float(correct[order[:kept]].mean())


def coverage_accuracy_auc(confidences, correct) -> float:
    """Area under the selective accuracy curve: the mean over k = 1..n of the accuracy on the k most confident items
    (1 when every answer the model is surer of is right; the plain accuracy when confidence carries no signal)."""
    confidences, correct = _array(confidences), _array(correct)
    order = np.argsort(-confidences, kind="stable")
    running = np.cumsum(correct[order]) / np.arange(1, confidences.size + 1)
    return float(running.mean())


def brier_score(probabilities, gold) -> float:
    """Multi-class Brier: mean over items of Σ_c (p_c − 1[c = gold])², over the scored classes."""
    probabilities = np.asarray(probabilities.detach().cpu() if hasattr(probabilities, "detach") else probabilities,
                               dtype=np.float64)
    gold = _array(gold, np.int64)
    one_hot = np.zeros_like(probabilities)
    one_hot[np.arange(len(gold)), gold] = 1.0
    return float(np.mean(np.sum((probabilities - one_hot) ** 2, axis=1)))


def negative_log_likelihood(gold_probabilities, floor: float = 1e-12) -> float:
    """Mean −log p(gold)."""
    return float(np.mean(-np.log(np.clip(_array(gold_probabilities), floor, 1.0))))


def reliability_diagram(confidences, correct, path: str | os.PathLike, n_bins: int = 10,
                        title: str = "Reliability") -> Path:
    """PNG: per-bin accuracy bars against the diagonal, the gap shaded, bin counts on the bars, ECE in the title."""
    confidences, correct = _array(confidences), _array(correct)
    counts, mean_confidence, accuracy = _bin_table(confidences, correct, bin_indices(confidences, n_bins), n_bins)
    ece = expected_calibration_error(confidences, correct, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins
    figure, axes = plt.subplots(figsize=(5, 5), dpi=120)
    filled = counts > 0
    axes.bar(centres[filled], accuracy[filled], width=width * 0.95, color="#4C72B0", edgecolor="white",
             label="accuracy")
    axes.bar(centres[filled], mean_confidence[filled] - accuracy[filled], bottom=accuracy[filled],
             width=width * 0.95, color="#DD8452", alpha=0.45, label="gap to confidence")
    axes.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
    for x, y, n in zip(centres[filled], accuracy[filled], counts[filled]):
        axes.text(x, min(y + 0.02, 0.95), str(int(n)), ha="center", fontsize=7)
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
             title=f"{title}\nECE = {ece:.4f}  (n = {confidences.size}, {n_bins} bins)")
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)
