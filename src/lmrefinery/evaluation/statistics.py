"""How sure we are: means and paired differences over seeds × test items, with 95% bootstrap confidence intervals.

Every comparison in `compare` is paired: a method and its reference baseline are scored on the same test items under
the same seeds, and the difference is taken per (seed, item). The test items are the unit that is resampled: a
bootstrap sample draws items with replacement and keeps each drawn item's values under every seed together (a
cluster bootstrap — the seeds of one item are not independent draws, so resampling (seed, item) pairs separately
would understate the uncertainty). Set-level metrics such as ECE, which have no per-item value, are recomputed on each
resampled item set.

The intervals come from `scipy.stats.bootstrap` (9,999 resamples, a fixed generator, so a report is reproducible):
- means of per-item values (accuracy, NLL, a paired difference of them): BCa;
- set metrics (ECE, a token-mean loss over all items) and their differences: the percentile interval of the
  bootstrap distribution re-centred on the estimate, [θ̂ + q_2.5(θ* − med θ*), θ̂ + q_97.5(θ* − med θ*)]. A set
  metric recomputed on resampled items is biased (duplicated items change the bins' accuracies), so BCa's and the
  plain percentile interval can lie wholly on one side of the estimate — an ECE of 0.0379 reported as [0.0234,
  0.0368]. Re-centring keeps the bootstrap's spread and always contains the estimate; the interval is then kept
  within the range the resamples reached, so an ECE interval never goes below 0.
When every resample gives the same value (e.g. a method compared with itself) the interval is that value.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 9999


@dataclass(frozen=True)
class Estimate:
    """A value with its 95% confidence interval."""

    value: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_json(self) -> dict:
        return asdict(self) | {"excludes_zero": self.excludes_zero}

    def format(self, spec: str = ".4f") -> str:
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def item_bootstrap(statistic: Callable[[np.ndarray], float], n_items: int, *, confidence: float = CONFIDENCE,
                   n_resamples: int = RESAMPLES, seed: int = 0, centred: bool = False) -> Estimate:
    """`statistic(item_indices)` on all items, with the CI from resampling the items with replacement: BCa, or with
    `centred` the percentile interval re-centred on the estimate (set metrics; see the module docstring)."""
    indices = np.arange(n_items)
    value = float(statistic(indices))
    if n_items < 2:
        return Estimate(value, math.nan, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on degenerate resamples; handled below
        result = stats.bootstrap((indices,), statistic, vectorized=False, confidence_level=confidence,
                                 n_resamples=n_resamples, method="percentile" if centred else "BCa",
                                 rng=np.random.default_rng(seed))
    if centred:
        distribution = result.bootstrap_distribution
        spread = distribution - np.median(distribution)
        tail = (1 - confidence) / 2
        # never past what any resample (or the estimate) reached: an ECE interval does not go below 0
        low = max(value + float(np.quantile(spread, tail)), min(value, float(distribution.min())))
        high = min(value + float(np.quantile(spread, 1 - tail)), max(value, float(distribution.max())))
        return Estimate(value, low, high)
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):  # all resamples equal: no spread to estimate
        low = high = value
    return Estimate(value, low, high)


def _per_seed_items(values: Sequence[Sequence[float]]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"expected values shaped [seeds, items], got {array.shape}")
    return array


def mean_estimate(values: Sequence[Sequence[float]], **options) -> Estimate:
    """The mean over seeds and items of per-item values [seeds, items] (e.g. each test example's loss)."""
    array = _per_seed_items(values)
    return item_bootstrap(lambda idx: array[:, idx].mean(), array.shape[1], **options)


def paired_difference(method: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]],
                      **options) -> Estimate:
    """Mean of method − baseline, paired per (seed, item): [seeds, items] each, same seeds and items in order."""
    a, b = _per_seed_items(method), _per_seed_items(baseline)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have the same shape, got {a.shape} and {b.shape}")
    difference = a - b
    return item_bootstrap(lambda idx: difference[:, idx].mean(), a.shape[1], **options)


def set_metric_estimate(metric: Callable[..., float], per_seed: Sequence[tuple], **options) -> Estimate:
    """A set-level metric (e.g. ECE) averaged over seeds; `per_seed[s]` are the metric's arguments for seed s, each
    an array over the same items."""
    arrays = [tuple(np.asarray(a) for a in arguments) for arguments in per_seed]
    n_items = len(arrays[0][0])
    return item_bootstrap(lambda idx: np.mean([metric(*(a[idx] for a in args)) for args in arrays]), n_items,
                          centred=True, **options)


def set_metric_difference(metric: Callable[..., float], method: Sequence[tuple], baseline: Sequence[tuple],
                          **options) -> Estimate:
    """metric(method) − metric(baseline), each averaged over seeds, on the same resampled items."""
    ours = [tuple(np.asarray(a) for a in arguments) for arguments in method]
    theirs = [tuple(np.asarray(a) for a in arguments) for arguments in baseline]
    n_items = len(ours[0][0])

    def statistic(idx: np.ndarray) -> float:
        return (np.mean([metric(*(a[idx] for a in args)) for args in ours])
                - np.mean([metric(*(a[idx] for a in args)) for args in theirs]))
    return item_bootstrap(statistic, n_items, centred=True, **options)
