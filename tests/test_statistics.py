"""Bootstrap confidence intervals against cases with a known answer; pairing and its sign."""

import math

import numpy as np
import pytest

from lmrefinery.compare.statistics import claims
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


def _interval(low: float, high: float) -> dict:
    return {"value": (low + high) / 2, "low": low, "high": high}


def _mixture(seed_orderings: list[bool], test_loss: dict) -> dict:
    return {"reference": "uniform",
            "weights": {"noisy_sources": ["noisy"],
                        "per_seed": {str(seed): {"noisy_below_clean": ok, "margin": 0.1 if ok else -0.1}
                                     for seed, ok in enumerate(seed_orderings)}},
            "methods": {"scalebio": {"difference": {"test_loss": test_loss}}}}


def _distillation(ece: dict, accuracy: dict, recalibration: dict) -> dict:
    return {"reference": "sft", "tests": {"in_domain": {
        "methods": {"first": {"difference": {"ece": ece, "accuracy": accuracy}}},
        "teacher_recalibration": {"difference": recalibration}}}}


@pytest.mark.parametrize("orderings, test_loss, expected_a, expected_b", [
    ([True, True, True], _interval(-0.3, -0.1), True, True),        # every seed ordered; CI below 0
    ([True, False, True], _interval(-0.3, 0.05), False, False),     # one seed misordered; CI across 0
    ([True], _interval(-0.3, 0.0), True, False),                    # CI touching 0 is not below it
])
def test_mixture_claims_on_designed_results_whose_verdict_is_known(orderings, test_loss, expected_a, expected_b):
    found = {c["claim"]: c for c in claims(_mixture(orderings, test_loss), None)}
    assert found["a"]["held"] is expected_a and found["b"]["held"] is expected_b
    assert found["b"]["evidence"] == test_loss


@pytest.mark.parametrize("ece, accuracy, recalibration, expected_c, expected_d", [
    (_interval(-0.05, -0.01), _interval(-0.02, 0.03), _interval(-0.08, -0.02), True, True),
    # calibration better but accuracy lower beyond its CI: not the paper's claim
    (_interval(-0.05, -0.01), _interval(-0.06, -0.001), _interval(-0.08, 0.01), False, False),
    # an ECE interval touching 0 is not below it; an accuracy interval touching 0 is not lower beyond it
    (_interval(-0.05, 0.0), _interval(-0.04, 0.0), _interval(-0.08, 0.0), False, False),
    (_interval(-0.05, -0.001), _interval(-0.04, 0.0), _interval(-0.08, -0.001), True, True),
])
def test_distillation_claims_on_designed_results_whose_verdict_is_known(ece, accuracy, recalibration, expected_c,
                                                                         expected_d):
    found = {c["claim"]: c for c in claims(None, _distillation(ece, accuracy, recalibration))}
    assert found["c"]["held"] is expected_c and found["d"]["held"] is expected_d
    assert found["c"]["evidence"] == {"ece_difference": ece, "accuracy_difference": accuracy}


def _ece_difference_trial(rng, overconfidence: float, n_items: int = 200):
    """Two students scored on the same items: A is calibrated; B is calibrated too, or overconfident by a margin."""
    confidence_a, confidence_b = rng.uniform(0.3, 1.0, n_items), rng.uniform(0.3, 1.0, n_items)
    correct_a = (rng.random(n_items) < confidence_a).astype(float)
    correct_b = (rng.random(n_items) < np.clip(confidence_b - overconfidence, 0, 1)).astype(float)
    return set_metric_difference(expected_calibration_error, [(confidence_b, correct_b)],
                                 [(confidence_a, correct_a)], n_resamples=499, seed=int(rng.integers(2**31)))


def test_ece_difference_intervals_cover_zero_for_equal_students_and_detect_a_real_gap():
    """Coverage: for two equally calibrated students the Δ-ECE interval excludes 0 in at most 8% of 200 trials; for
    a student 0.2 overconfident it excludes 0, on the right side, in most trials. Every interval contains its
    estimate (set metrics are biased under resampling; the interval is re-centred on the estimate)."""
    rng = np.random.default_rng(0)
    equal = [_ece_difference_trial(rng, 0.0) for _ in range(200)]
    assert np.mean([e.excludes_zero for e in equal]) <= 0.08
    gap = [_ece_difference_trial(rng, 0.2) for _ in range(40)]
    assert np.mean([e.low > 0 for e in gap]) >= 0.75
    assert all(e.low <= e.value <= e.high for e in equal + gap)


def test_a_set_metric_interval_contains_its_estimate_where_the_bootstrap_is_biased():
    """A small, well-calibrated item set: ECE on resampled items runs above the estimate (duplicated items make the
    bins' accuracies noisier), yet the reported interval contains the estimate."""
    rng = np.random.default_rng(3)
    for trial in range(40):
        confidence = rng.uniform(0.2, 1.0, 60)
        correct = (rng.random(60) < confidence).astype(float)
        estimate = set_metric_estimate(expected_calibration_error, [(confidence, correct)], n_resamples=499,
                                       seed=trial)
        assert 0 <= estimate.low <= estimate.value <= estimate.high, (trial, estimate)


@pytest.mark.parametrize("ece, accuracy, expected", [
    (_interval(-0.04, -0.01), _interval(-0.01, 0.02), True),    # better calibrated than one fitted temperature
    (_interval(-0.04, 0.01), _interval(0.01, 0.05), False),     # more accurate, but not better calibrated
    (_interval(-0.04, -0.01), _interval(-0.05, -0.01), False),  # better calibrated at a cost in accuracy
])
def test_first_against_temperature_scaling_is_a_claim_of_its_own(ece, accuracy, expected):
    distillation = _distillation(_interval(-0.1, -0.05), _interval(0.0, 0.1), _interval(-0.1, -0.05))
    nll = _interval(-0.2, 0.1)
    distillation["tests"]["in_domain"]["first_vs_temperature_scaling"] = {"ece": ece, "accuracy": accuracy, "nll": nll}
    found = [c for c in claims(None, distillation) if c["claim"] == "e"]
    assert len(found) == 1 and found[0]["held"] is expected
    assert found[0]["evidence"] == {"ece_difference": ece, "accuracy_difference": accuracy, "nll_difference": nll}
    assert not [c for c in claims(None, _distillation(ece, accuracy, ece)) if c["claim"] == "e"]


@pytest.mark.parametrize("in_domain, out_of_domain, expected", [
    # (Δ accuracy, Δ ECE) per test: the headline needs both better, on both tests
    ((_interval(0.01, 0.05), _interval(-0.04, -0.01)), (_interval(0.002, 0.04), _interval(-0.05, -0.02)), True),
    ((_interval(0.01, 0.05), _interval(-0.04, -0.01)), (_interval(-0.01, 0.04), _interval(-0.05, -0.02)), False),
    ((_interval(0.01, 0.05), _interval(-0.04, 0.002)), (_interval(0.002, 0.04), _interval(-0.05, -0.02)), False),
])
def test_the_papers_headline_needs_accuracy_up_and_ece_down_on_every_test(in_domain, out_of_domain, expected):
    distillation = _distillation(in_domain[1], in_domain[0], _interval(-0.1, -0.05))
    distillation["tests"]["out_of_domain"] = {
        "methods": {"first": {"difference": {"ece": out_of_domain[1], "accuracy": out_of_domain[0]}}},
        "teacher_recalibration": {"difference": _interval(-0.1, -0.05)}}
    (headline,) = [c for c in claims(None, distillation) if c["claim"] == "h"]
    assert headline["held"] is expected
    assert headline["evidence"]["out_of_domain"] == {"accuracy_difference": out_of_domain[0],
                                                     "ece_difference": out_of_domain[1]}
