"""The temperature search is optimistic on its own items; the cross-validated figure is not (designed data)."""

import numpy as np
import torch

from lmrefinery.distill.temperature import cross_validated_search, score_temperature, search_temperature

SEARCH = {"transform": "logit_temperature", "objective": "ece", "n_bins": 10}


def _teacher(seed: int, overconfidence: float, n: int = 600):
    """Two cached tokens holding all the mass (so the logit temperature at T = 1 is the teacher as it is); the top
    token is right with probability q − overconfidence, q its confidence. Each position is its own example."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.5, 0.95, n)
    correct = rng.random(n) < np.clip(q - overconfidence, 0, 1)
    logprobs = torch.tensor(np.log(np.stack([q, 1 - q], 1) * (1 - 1e-6)), dtype=torch.float32)
    return logprobs, torch.full((n,), float(np.log(1e-6))), torch.tensor(np.where(correct, 0, 1)), torch.arange(n)


def _gains(overconfidence: float) -> tuple[list[float], list[float]]:
    in_sample, out_of_sample = [], []
    for seed in range(8):
        logprobs, tails, targets, groups = _teacher(100 + seed, overconfidence)
        before = score_temperature(logprobs, tails, targets, None, 1.0, 10)["ece"]
        chosen, _ = search_temperature(logprobs, tails, targets, **SEARCH)
        crossed = cross_validated_search(logprobs, tails, targets, groups, folds=5, **SEARCH)
        in_sample.append(before - chosen["ece"])
        out_of_sample.append(before - crossed["ece"])
    return in_sample, out_of_sample


def test_a_search_on_pure_noise_gains_in_sample_and_not_out_of_sample():
    """A teacher calibrated as it is: no temperature can truly help. The search still finds an ECE gain on its own
    items in every seed; cross-validated, the gain is mostly gone."""
    in_sample, out_of_sample = _gains(0.0)
    assert all(gain > 0 for gain in in_sample)
    assert np.mean(out_of_sample) < 0.3 * np.mean(in_sample)


def test_a_real_miscalibration_is_fixed_out_of_sample_too():
    in_sample, out_of_sample = _gains(0.2)
    assert all(gain > 0.05 for gain in out_of_sample)
    assert np.mean(out_of_sample) > 0.8 * np.mean(in_sample)


def test_folds_are_made_of_examples_not_positions():
    """Three examples of 20 positions: at most three folds, however many are asked for; one example: none."""
    logprobs, tails, targets, _ = _teacher(0, 0.1, n=60)
    groups = torch.arange(60) // 20
    result = cross_validated_search(logprobs, tails, targets, groups, folds=5, **SEARCH)
    assert result["folds"] == 3 and len(result["temperatures"]) == 3
    assert cross_validated_search(logprobs[:20], tails[:20], targets[:20], groups[:20], **SEARCH) is None
