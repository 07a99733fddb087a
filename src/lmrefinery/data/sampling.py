"""Which examples make up each global batch: seeded, reproducible, and resumable from a small state.

- proportional: shuffled passes over the pooled examples (each example once per pass), so sources appear in
  proportion to their sizes.
- uniform / weights: each slot of a batch picks a source by its probability, then the next example of that source's
  own shuffled pass (without replacement within a pass; a new shuffle when a source runs out).
- stratified: every batch holds a fixed share of each source — batch / K each, the remainder of an uneven division
  going to the sources in turn — taken from each source's own shuffled pass. With a loss normalised per source
  (ScaleBiO's p_i / N_i) this changes no expectation, and a small source is in every batch instead of a few.

The state (`step` and per-source cursors) is the data position saved in checkpoints.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from lmrefinery.config import SamplingConfig
from lmrefinery.errors import UserError


def _permutation(size: int, seed: int, stream: int, epoch: int) -> np.ndarray:
    """One pass's order, as an int64 array (a Python list of 10M ints would cost 360 MB, the array 80 MB)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + stream * 7919 + epoch) % (2**63))
    return torch.randperm(size, generator=generator).numpy()


def _as_array(indices) -> np.ndarray:
    if isinstance(indices, range):
        return np.arange(indices.start, indices.stop, indices.step, dtype=np.int64)
    return np.asarray(indices, dtype=np.int64)


def read_weights_file(path: str | Path) -> dict[str, float]:
    """`{"weights": {source: w}, ...}` (what `reweight` writes) or a plain `{source: w}` mapping."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: weights file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a JSON weights file ({exc})") from None
    weights = document.get("weights", document) if isinstance(document, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, (int, float)) for v in weights.values()):
        raise UserError(f"{path}: expected {{\"weights\": {{source_name: number}}}}")
    return {str(k): float(v) for k, v in weights.items()}


def source_probabilities(sampling: SamplingConfig, names: list[str], sizes: list[int],
                         key: str = "sampling.weights") -> list[float]:
    if sampling.strategy == "uniform":
        return [1.0 / len(names)] * len(names)
    if sampling.strategy == "proportional":
        total = sum(sizes)
        return [size / total for size in sizes]
    weights = sampling.weights
    origin = key
    if isinstance(weights, str):
        origin = weights
        weights = read_weights_file(weights)
    missing = [n for n in names if n not in weights]
    unknown = [n for n in weights if n not in names]
    if missing or unknown:
        raise UserError(f"{origin}: weights must name exactly the configured sources {names}; "
                        f"missing {missing}, unknown {unknown}")
    values = [weights[n] for n in names]
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{origin}: weights must be finite numbers, got {values}")
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise UserError(f"{origin}: weights must be non-negative with a positive sum, got {values}")
    return [v / sum(values) for v in values]


class MixtureSampler:
    def __init__(self, source_indices: list, probabilities: list[float], batch_size: int, seed: int,
                 pooled: bool, stratified: bool = False):
        """`source_indices`: each source's pool positions (ranges or sequences of ints)."""
        self.source_indices = source_indices
        self.probabilities = torch.tensor(probabilities, dtype=torch.float64)
        self.batch_size = batch_size
        self.seed = seed
        self.pooled, self.stratified = pooled, stratified
        self.pool = (np.concatenate([_as_array(indices) for indices in source_indices]) if pooled
                     else np.zeros(0, dtype=np.int64))
        self.step = 0
        self.cursors = [0] * len(source_indices)  # examples drawn so far from each source (pooled: index 0 only)
        # each stream's current pass (epoch, shuffled order): derived from (seed, stream, epoch), so it is not state,
        # and computed once per pass — a draw costs O(1), not a new permutation of the whole pool
        self._passes: dict[int, tuple[int, list[int]]] = {}

    @classmethod
    def build(cls, sampling: SamplingConfig, names: list[str], source_indices: list, batch_size: int,
              seed: int) -> "MixtureSampler":
        sizes = [len(indices) for indices in source_indices]
        if sampling.strategy == "stratified":
            return cls(source_indices, [1.0 / len(sizes)] * len(sizes), batch_size, seed, pooled=False,
                       stratified=True)
        return cls(source_indices, source_probabilities(sampling, names, sizes), batch_size, seed,
                   pooled=sampling.strategy == "proportional")

    def _draw(self, stream: int, items, cursor: int) -> int:
        epoch, offset = divmod(cursor, len(items))
        current = self._passes.get(stream)
        if current is None or current[0] != epoch:
            current = self._passes[stream] = (epoch, _permutation(len(items), self.seed, stream, epoch))
        return int(items[int(current[1][offset])])

    def next_batch(self) -> list[int]:
        """Indices into the pool for the next global batch."""
        if self.pooled:
            batch = [self._draw(0, self.pool, self.cursors[0] + j) for j in range(self.batch_size)]
            self.cursors[0] += self.batch_size
        elif self.stratified:
            sources = len(self.source_indices)
            base, extra = divmod(self.batch_size, sources)
            batch = []
            for source in range(sources):
                count = base + (1 if (source - self.step * extra) % sources < extra else 0)
                batch += [self._draw(source + 1, self.source_indices[source], self.cursors[source] + j)
                          for j in range(count)]
                self.cursors[source] += count
        else:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 104_729 * (self.step + 1))
            choices = torch.multinomial(self.probabilities, self.batch_size, replacement=True, generator=generator)
            batch = []
            for source in choices.tolist():
                batch.append(self._draw(source + 1, self.source_indices[source], self.cursors[source]))
                self.cursors[source] += 1
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"step": self.step, "cursors": list(self.cursors)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.cursors = [int(c) for c in state["cursors"]]
