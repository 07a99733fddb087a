"""Bootstrap confidence intervals against cases with a known answer; pairing and its sign."""

import math

import numpy as np
import pytest

from lmrefinery.evaluation.calibration import expected_calibration_error
from lmrefinery.evaluation.statistics import (mean_estimate, paired_difference, set_metric_difference,
                                              set_metric_estimate)


def test_mean_interval_matches_the_normal_theory_interval():
    """For n = 3000 normal values the bootstrap CI of the mean is mean ± 1.96·s/√n (to a few percent)."""
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 2.0, size=(1, 3000))
    estimate = mean_estimate(values, n_resamples=4000)
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert estimate.value == pytest.approx(values.mean())
    assert estimate.low == pytest.approx(values.mean() - half, abs=0.08 * half)
    assert estimate.high == pytest.approx(values.mean() + half, abs=0.08 * half)


def test_items_are_resampled_with_their_seeds_together():
    """Three seeds that agree perfectly per item carry no more information than one: the cluster bootstrap's
    interval is as wide as the one-seed interval, not √3 times narrower."""
    rng = np.random.default_rng(1)
    one = rng.normal(0.0, 1.0, size=(1, 400))
    three = np.repeat(one, 3, axis=0)
    width = lambda e: e.high - e.low  # noqa: E731
    assert width(mean_estimate(three, n_resamples=3000)) == pytest.approx(width(mean_estimate(one, n_resamples=3000)),
                                                                         rel=1e-9)


def test_a_method_compared_with_itself_has_an_interval_containing_zero():
    values = np.random.default_rng(2).normal(size=(3, 200))
    difference = paired_difference(values, values)
    assert difference.value == 0.0 and difference.low <= 0.0 <= difference.high
    assert not difference.excludes_zero


def test_pairing_detects_a_small_consistent_gain_that_unpaired_items_hide():
    """Items vary a lot (σ = 1) but the method is better on every item by 0.03 (± 0.02): the paired difference is
    negative with a CI excluding 0; pairing the method with the wrong items gives a CI that contains 0."""
    rng = np.random.default_rng(3)
    baseline = rng.normal(2.0, 1.0, size=(3, 300))
    method = baseline - 0.03 + rng.normal(0.0, 0.02, size=baseline.shape)
    paired = paired_difference(method, baseline, n_resamples=3000)
    assert paired.high < 0 and paired.excludes_zero and paired.value == pytest.approx(-0.03, abs=0.005)
    shuffled = paired_difference(method[:, rng.permutation(300)], baseline, n_resamples=3000)
    assert shuffled.low < 0 < shuffled.high
    reverse = paired_difference(baseline, method, n_resamples=3000)
    assert reverse.low > 0 and reverse.value == pytest.approx(-paired.value)


def test_set_metric_intervals_recompute_the_metric_on_resampled_items():
    """ECE of a calibrated predictor (confidence = true probability) vs an overconfident one: the difference is
    negative and its CI excludes 0; ECE of one seed equals the direct computation."""
    rng = np.random.default_rng(4)
    seeds = []
    for _ in range(3):
        truth = rng.uniform(0.3, 0.9, size=500)
        correct = (rng.uniform(size=500) < truth).astype(float)
        seeds.append((truth, correct, np.minimum(truth + 0.25, 1.0)))
    calibrated = [(truth, correct) for truth, correct, _ in seeds]
    overconfident = [(over, correct) for _, correct, over in seeds]
    estimate = set_metric_estimate(expected_calibration_error, calibrated, n_resamples=2000)
    assert estimate.value == pytest.approx(np.mean([expected_calibration_error(*s) for s in calibrated]))
    difference = set_metric_difference(expected_calibration_error, calibrated, overconfident, n_resamples=2000)
    assert difference.high < 0 and difference.value == pytest.approx(
        estimate.value - np.mean([expected_calibration_error(*s) for s in overconfident]))
