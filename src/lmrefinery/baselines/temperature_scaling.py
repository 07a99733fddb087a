"""Post-hoc temperature scaling (the classic calibration baseline): one scalar T on the logits, fitted by NLL."""

from __future__ import annotations

import math

import torch


def fit_temperature(logits: torch.Tensor, gold_token_ids: list[list[int]], low: float = 0.05,
                    high: float = 20.0, points: int = 200) -> float:
    """Post-hoc temperature scaling: the T minimising the mean NLL of the gold answer, −log Σ_{v ∈ gold} softmax(z/T)_v.

    A log-spaced grid, then a golden-section search between the best grid point's neighbours: the NLL is smooth in
    log T, and a grid first avoids trusting it to be unimodal over four decades.
    """
    logits = logits.double()

    def nll(temperature: float) -> float:
        log_probs = torch.log_softmax(logits / temperature, dim=-1)
        return -float(torch.stack([torch.logsumexp(log_probs[row, ids], dim=0)
                                   for row, ids in enumerate(gold_token_ids)]).mean())

    grid = torch.logspace(math.log10(low), math.log10(high), points, dtype=torch.float64).tolist()
    values = [nll(t) for t in grid]
    best = min(range(points), key=values.__getitem__)
    a, b = math.log(grid[max(best - 1, 0)]), math.log(grid[min(best + 1, points - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if nll(math.exp(c)) <= nll(math.exp(d)):
            b = d
        else:
            a = c
    return math.exp((a + b) / 2)
