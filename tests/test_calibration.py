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
