"""Calibration metrics against direct computations, including confidences exactly 0, 1 and on bin edges."""

import numpy as np
import pytest
import torch

from lmrefinery.evaluation.calibration import (adaptive_calibration_error, bin_indices, brier_score,
                                               expected_calibration_error, maximum_calibration_error,
                                               negative_log_likelihood, reliability_diagram)


def _direct_ece(confidences, correct, n_bins):
    """Straight from the definition: bins (k/M, (k+1)/M], the first also taking 0."""
    total, n = 0.0, len(confidences)
    for k in range(n_bins):
        low, high = k / n_bins, (k + 1) / n_bins
        members = [i for i, c in enumerate(confidences) if (low < c <= high) or (k == 0 and c == 0.0)]
        if members:
            accuracy = sum(correct[i] for i in members) / len(members)
            confidence = sum(confidences[i] for i in members) / len(members)
            total += len(members) / n * abs(accuracy - confidence)
    return total


@pytest.mark.parametrize("n_bins", [10, 15])
def test_ece_matches_direct_computation(n_bins):
    rng = np.random.default_rng(0)
    edges = [k / n_bins for k in range(n_bins + 1)]
    confidences = list(rng.uniform(0, 1, 300)) + [0.0, 1.0, 1.0] + edges * 3
    correct = [int(rng.uniform() < c) for c in confidences]
    expected = _direct_ece(confidences, correct, n_bins)
    assert expected_calibration_error(confidences, correct, n_bins) == pytest.approx(expected, abs=1e-12)
    assert expected_calibration_error(torch.tensor(confidences), torch.tensor(correct), n_bins) == pytest.approx(
        expected, abs=1e-6)


def test_bin_edges_belong_to_the_bin_below_and_one_is_in_the_last_bin():
    assert bin_indices([0.0, 0.1, 0.1000001, 0.3, 0.5, 0.9, 0.95, 1.0], 10).tolist() == [0, 0, 1, 2, 4, 8, 9, 9]


def test_perfectly_calibrated_and_worst_cases():
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0
    assert expected_calibration_error([1.0, 1.0], [0, 0]) == 1.0
    assert maximum_calibration_error([0.95, 0.95, 0.15], [1, 0, 0]) == pytest.approx(0.45)


def test_adaptive_ece_uses_equal_mass_bins():
    confidences = [0.1, 0.2, 0.8, 0.9]
    correct = [0, 1, 1, 1]
    expected = 0.5 * abs(0.5 - 0.15) + 0.5 * abs(1.0 - 0.85)
    assert adaptive_calibration_error(confidences, correct, n_bins=2) == pytest.approx(expected)


def test_brier_and_nll():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    gold = [0, 1]
    expected = ((0.3 ** 2 + 0.2 ** 2 + 0.1 ** 2) + (0.1 ** 2 + 0.9 ** 2 + 0.8 ** 2)) / 2
    assert brier_score(probabilities, gold) == pytest.approx(expected)
    assert negative_log_likelihood([0.7, 0.1]) == pytest.approx(-(np.log(0.7) + np.log(0.1)) / 2)


def test_reliability_diagram_writes_png(tmp_path):
    path = reliability_diagram([0.2, 0.7, 0.9, 1.0], [0, 1, 1, 0], tmp_path / "r.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("n", [500, 997, 2000])
def test_metrics_equal_torchmetrics_and_netcal_on_random_inputs(n):
    """Softmax outputs of random logits over 5 classes: confidence = top-1 probability, correct = top-1 is the
    target. ECE and MCE against torchmetrics and netcal, equal-mass ECE against netcal's equal-frequency ECE, the
    Brier score against torchmetrics' mean squared error of the one-hot target (× classes)."""
    from netcal.metrics import ECE, MCE
    from torchmetrics.functional import mean_squared_error
    from torchmetrics.functional.classification import multiclass_calibration_error

    from lmrefinery.evaluation.calibration import equal_mass_calibration_error

    rng = np.random.default_rng(n)
    logits = rng.normal(size=(n, 5)) * 2
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    target = rng.integers(0, 5, n)
    confidence, correct = probabilities.max(1), (probabilities.argmax(1) == target).astype(float)
    as_torch = torch.tensor(probabilities, dtype=torch.float64), torch.tensor(target)
    for bins in (10, 15):
        for ours, norm, netcal in ((expected_calibration_error, "l1", ECE), (maximum_calibration_error, "max", MCE)):
            value = ours(confidence, correct, bins)
            assert value == pytest.approx(
                multiclass_calibration_error(*as_torch, num_classes=5, n_bins=bins, norm=norm).item(), abs=1e-6)
            assert value == pytest.approx(netcal(bins=bins).measure(confidence, correct.astype(int)), abs=1e-6)
        assert equal_mass_calibration_error(confidence, correct, bins) == pytest.approx(
            ECE(bins=bins, equal_intervals=False).measure(confidence, correct.astype(int)), abs=1e-6)
    one_hot = np.eye(5)[target]
    assert brier_score(probabilities, target) == pytest.approx(
        5 * mean_squared_error(torch.tensor(probabilities), torch.tensor(one_hot)).item(), abs=1e-6)


def test_selective_accuracy_and_the_coverage_curve_on_designed_inputs():
    from lmrefinery.evaluation.calibration import coverage_accuracy_auc, selective_accuracy

    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    ranked = np.array([1, 1, 1, 1, 0, 1, 0, 0, 0, 0], dtype=float)  # right exactly where it is surest
    assert selective_accuracy(confidence, ranked, 0.4) == 1.0 and selective_accuracy(confidence, ranked, 1.0) == 0.5
    assert selective_accuracy(confidence, ranked, 0.6) == pytest.approx(5 / 6)
    expected = np.mean(np.cumsum(ranked) / np.arange(1, 11))
    assert coverage_accuracy_auc(confidence, ranked) == pytest.approx(expected)
    assert coverage_accuracy_auc(confidence, ranked[::-1]) < 0.5 < coverage_accuracy_auc(confidence, ranked)
    with pytest.raises(ValueError):
        selective_accuracy(confidence, ranked, 0.0)
