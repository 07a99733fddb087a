"""Turning source weights or per-example scores into an SFT set, as pure functions over indices.

- `draw_mixture`: N examples with source shares following the weights (largest-remainder counts); each source's
  examples come in a seeded shuffled order, without replacement until the source runs out, then with replacement —
  so the realised shares follow the weights even when a favoured source is small.
- `fill_budget`: how many of an ordered list of candidates fit a token budget, in whole batches.
- `rank_by_score`: the order in which score-based selection (LESS-style, RHO-style) takes candidates.
`mix` and `compare` both use these, so a learned mixture is drawn the same way everywhere.
"""

from __future__ import annotations

import math
import random

import torch

from lmrefinery.errors import UserError


def mixture_counts(total: int, weights: list[float]) -> list[int]:
    """⌊total·p_i⌋ per source, the remainder going to the largest fractional parts (ties: the lower index)."""
    exact = [total * w for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw_source(size: int, count: int, rng: random.Random) -> tuple[list[int], int]:
    """`count` indices into a source of `size` examples: a shuffled pass first, then draws with replacement.
    Returns the indices and how many of them were drawn with replacement."""
    order = list(range(size))
    rng.shuffle(order)
    unique = order[: min(count, size)]
    extra = [rng.randrange(size) for _ in range(count - len(unique))]
    return unique + extra, len(extra)


def draw_mixture(source_sizes: list[int], weights: list[float], count: int,
                 seed: int) -> tuple[list[tuple[int, int]], list[int]]:
    """(source, index within the source) for `count` examples, shuffled; and per source how many were drawn again
    after it ran out. Weights must be normalised."""
    drawn, repeated = [], []
    for source, (size, number) in enumerate(zip(source_sizes, mixture_counts(count, weights))):
        indices, again = draw_source(size, number, random.Random(seed * 1_000_003 + source))
        drawn += [(source, index) for index in indices]
        repeated.append(again)
    random.Random(seed).shuffle(drawn)
    return drawn, repeated


def fill_budget(lengths: list[int], budget: int, batch_size: int) -> int:
    """How many of the ordered candidates make the SFT set: the longest prefix within `budget` tokens, cut to whole
    batches so that one pass of the SFT run sees each chosen example exactly once."""
    total = count = 0
    for length in lengths:
        if total + length > budget:
            break
        total += length
        count += 1
    count -= count % batch_size
    if count == 0:
        raise UserError(f"mixture: a token budget of {budget} does not fit one batch of {batch_size} examples; "
                        "raise mixture.token_budget (or mixture.num_examples)")
    return count


def mixture_within_budget(source_sizes: list[int], weights: list[float], length_of, budget: int, batch_size: int,
                          seed: int) -> list[tuple[int, int]]:
    """A weighted mixture that fills `budget` tokens in whole batches: the smallest draw whose examples exceed the
    budget (grown a batch at a time from the weighted mean length), then its longest prefix within the budget.
    `length_of(source, index)` is an example's token count."""
    mean = sum(w * sum(length_of(s, i) for i in range(n)) / n for s, (n, w) in enumerate(zip(source_sizes, weights)))
    count = max(batch_size, int(budget // max(mean, 1.0)))
    while True:
        drawn, _ = draw_mixture(source_sizes, weights, count, seed)
        lengths = [length_of(source, index) for source, index in drawn]
        if sum(lengths) > budget:
            return drawn[: fill_budget(lengths, budget, batch_size)]
        count += batch_size


def rank_by_score(scores: torch.Tensor) -> list[int]:
    """Indices from the highest score down; ties go to the lower index."""
    return torch.argsort(-scores.double(), stable=True).tolist()


def realised_shares(sources: list[int], names: list[str]) -> dict[str, float]:
    """The fraction of examples each source has in a drawn set (to report beside the weights asked for)."""
    total = max(len(sources), 1)
    return {name: sum(1 for s in sources if s == index) / total for index, name in enumerate(names)}
