"""Tokenising a source's batches in worker processes, in order, with a bounded number in flight.

Profiled on one core, about nine tenths of a first load is `ChatEncoder.encode_many` (chat-template rendering in
Python, then the tokenizer's batch call); reading and parsing the records is the rest. So records are still read and
parsed here, in order and with their file:line locations (the bad-record policy needs both), and only the encoding of
each batch goes to a worker. Workers are spawned (a fork after torch and the tokenizer's thread pool have started can
deadlock) and each gets the encoder once; the tokenizer's own thread pool is switched off in them, since the
processes already fill the cores. At most 2 × workers batches are in flight, so memory stays bounded however large
the source.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from collections import deque
from collections.abc import Iterable, Iterator

_encoder = None  # the worker's own copy


def _start_worker(encoder_bytes: bytes) -> None:
    global _encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _encoder = pickle.loads(encoder_bytes)


def _encode(items: list) -> list:
    return _encoder.encode_many(items)


def encoded_batches(encoder, batches: Iterable[list], processes: int) -> Iterator[list]:
    """`encoder.encode_many(batch)` for every batch, in order: here (processes ≤ 1) or in worker processes."""
    if processes <= 1:
        for batch in batches:
            yield encoder.encode_many(batch)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes, initializer=_start_worker, initargs=(pickle.dumps(encoder),)) as pool:
        in_flight: deque = deque()
        for batch in batches:
            in_flight.append(pool.apply_async(_encode, (batch,)))
            if len(in_flight) >= 2 * processes:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()
