"""Tokenised examples as columns: ids and labels as flat int32 arrays cut by offsets, never a Python list per example.

Why: as Python lists a token costs about 36 bytes (an int object and a list slot, twice: ids and labels), so a pool of
a million chat examples held 7.7 GB. As columns it costs 8 bytes, and read from the pool cache (data/pool_cache.py)
nothing until it is touched: the arrays are then memory-mapped views of the cache's Arrow file, and a run reads from
disk only the rows its batches draw.

A source is a list of chunks (the record batches of its cache file, or arrays built in memory when the cache is off);
the pool is the sources' chunks in config order. `PoolExamples[i]` builds the one `TokenizedExample` a caller asks
for, so the samplers, the collator and every command see the same examples as before.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    source_id: int
    record: int = -1  # position of its record in the source file (data selection writes the chosen records back)


@dataclass(frozen=True)
class TokenChunk:
    """Consecutive examples of one source: example j is ids[offsets[j]:offsets[j + 1]] (labels alike)."""

    ids: np.ndarray  # int32 (read from the pool cache: a data.pool_cache.FileColumn, sliced alike)
    labels: np.ndarray  # int32, aligned with ids
    offsets: np.ndarray  # rows + 1 non-decreasing positions into ids / labels
    records: np.ndarray  # int64, the record each example came from

    @property
    def rows(self) -> int:
        return len(self.offsets) - 1


class ChunkBuilder:
    """Collects encoded examples in compact typed arrays; `take()` hands them over as a chunk and starts again."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self._ids, self._labels = array("i"), array("i")
        self._offsets, self._records = array("q", [0]), array("q")

    def add(self, input_ids: list[int], labels: list[int], record: int) -> None:
        self._ids.extend(input_ids)
        self._labels.extend(labels)
        self._offsets.append(len(self._ids))
        self._records.append(record)

    def __len__(self) -> int:
        return len(self._records)

    def take(self) -> TokenChunk:
        chunk = TokenChunk(np.frombuffer(self._ids, dtype=np.int32).copy(),
                           np.frombuffer(self._labels, dtype=np.int32).copy(),
                           np.frombuffer(self._offsets, dtype=np.int64).copy(),
                           np.frombuffer(self._records, dtype=np.int64).copy())
        self._reset()
        return chunk


class PoolExamples(Sequence):
    """The examples of all sources, indexable like a list of TokenizedExample (built on access)."""

    def __init__(self, sources: list[list[TokenChunk]]):
        self._chunks = [chunk for chunks in sources for chunk in chunks if chunk.rows]
        self._chunk_source = [source for source, chunks in enumerate(sources) for chunk in chunks if chunk.rows]
        self._starts = np.concatenate([[0], np.cumsum([chunk.rows for chunk in self._chunks], dtype=np.int64)])
        self.source_sizes = [sum(chunk.rows for chunk in chunks) for chunks in sources]
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of a pool of {len(self)}")
        chunk = int(np.searchsorted(self._starts, index, side="right")) - 1
        return chunk, index - int(self._starts[chunk])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        chunk_index, row = self._locate(int(index))
        return self._example(chunk_index, row)

    def _example(self, chunk_index: int, row: int) -> TokenizedExample:
        chunk = self._chunks[chunk_index]
        start, end = int(chunk.offsets[row]), int(chunk.offsets[row + 1])
        return TokenizedExample(chunk.ids[start:end].tolist(), chunk.labels[start:end].tolist(),
                                self._chunk_source[chunk_index], int(chunk.records[row]))

    def __iter__(self) -> Iterator[TokenizedExample]:
        for chunk_index, chunk in enumerate(self._chunks):
            for row in range(chunk.rows):
                yield self._example(chunk_index, row)

    def source_of(self, index: int) -> int:
        return self._chunk_source[self._locate(int(index))[0]]

    def lengths(self) -> np.ndarray:
        """Every example's token count (int64), in pool order; read from the offsets alone."""
        if self._lengths is None:
            self._lengths = (np.concatenate([np.diff(chunk.offsets).astype(np.int64) for chunk in self._chunks])
                             if self._chunks else np.zeros(0, dtype=np.int64))
        return self._lengths
