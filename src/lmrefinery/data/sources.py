"""Named data sources, tokenised once, pooled in config order with deterministic source ids.

The pool holds its examples as columns (data/token_columns.py): memory-mapped from the pool cache when the source
was tokenised before, else built chunk by chunk while tokenising (and written to the cache as they are built).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import asdict, dataclass, field

from lmrefinery.config import DataConfig, SourceConfig
from lmrefinery.data.files import BadRecord, read_records
from lmrefinery.data.formats import Conversation, detect_format, parse_record
from lmrefinery.data.parallel_encode import encoded_batches
from lmrefinery.data.pool_cache import CacheWriter, load_cached, source_key
from lmrefinery.data.token_columns import ChunkBuilder, PoolExamples, TokenChunk, TokenizedExample
from lmrefinery.data.tokenize import IGNORE_INDEX, ChatEncoder
from lmrefinery.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["TokenizedExample", "SourceStats", "SourcePool", "load_source", "load_pool", "read_conversations"]

CHUNK_ROWS = 16384  # examples per chunk: what a first load holds in memory before it goes to the cache file
ENCODE_BATCH = 512  # records rendered, then tokenised in one batched call


@dataclass
class SourceStats:
    name: str
    path: str
    format: str = ""
    records: int = 0
    examples: int = 0
    skipped: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    skip_reasons: list[str] = field(default_factory=list)  # first few, for the log


@dataclass
class SourcePool:
    """All examples of all sources; `examples[i].source_id` indexes `names`. Sources are contiguous, in order."""

    names: list[str]
    examples: PoolExamples
    stats: list[SourceStats]

    @property
    def sizes(self) -> list[int]:
        return list(self.examples.source_sizes)

    def counts(self, indices) -> dict[str, int]:
        """How many of the examples at `indices` come from each source (by name)."""
        counts = dict.fromkeys(self.names, 0)
        for index in indices:
            counts[self.names[self.examples.source_of(index)]] += 1
        return counts

    def source_indices(self) -> list[range]:
        """Positions in `examples` of each source's examples, in file order."""
        ranges, start = [], 0
        for size in self.examples.source_sizes:
            ranges.append(range(start, start + size))
            start += size
        return ranges

    def lengths(self):
        """Every example's token count, in pool order (a numpy array read from the offsets)."""
        return self.examples.lengths()


def _fit_length(input_ids: list[int], labels: list[int], data: DataConfig, stats: SourceStats, location: str):
    if len(input_ids) <= data.max_length:
        return input_ids, labels
    if data.truncation == "drop":
        stats.dropped_too_long += 1
        return None
    stats.truncated += 1
    input_ids, labels = input_ids[: data.max_length], labels[: data.max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise BadRecord(location, f"no response tokens left after truncation to max_length={data.max_length}")
    return input_ids, labels


def load_source(spec: SourceConfig, source_id: int, encoder: ChatEncoder, data: DataConfig) -> tuple[
        PoolExamples, SourceStats]:
    """The source's examples (as columns; `source_id` is the id they carry) and statistics: memory-mapped from the
    pool cache when this source was tokenised before with the same files, tokenizer and settings
    (data/pool_cache.py), else read and tokenised now (and cached)."""
    chunks, stats = _source_chunks(spec, encoder, data)
    return PoolExamples([[]] * source_id + [chunks]), stats


def _source_chunks(spec: SourceConfig, encoder: ChatEncoder, data: DataConfig) -> tuple[list[TokenChunk],
                                                                                          SourceStats]:
    key = source_key(spec, encoder.fingerprint, data) if data.cache else None
    cached = load_cached(key) if key else None
    if cached is None and key:
        writer = CacheWriter(key)
        try:
            _, stats = _tokenise_source(spec, encoder, data, writer.write)
        except BaseException:
            writer.abort()
            raise
        writer.finish(asdict(stats))
        cached = load_cached(key)  # what was just written (or what another process completed first), mapped
    if cached is None:  # no cache: the chunks stay in memory
        chunks: list[TokenChunk] = []
        _, stats = _tokenise_source(spec, encoder, data, chunks.append)
        return chunks, stats
    chunks, stored = cached
    stats = SourceStats(**{**stored, "name": spec.name, "path": spec.path})
    log.info("source %s: %d tokenised examples from the cache", spec.name, stats.examples)
    if stats.skipped:
        log.warning("source %s: skipped %d bad records, e.g. %s", spec.name, stats.skipped, stats.skip_reasons[0])
    return chunks, stats


def _parsed_records(spec: SourceConfig, stats: SourceStats):
    """(record index, location, parsed example or BadRecord) for every record up to the source's limit."""
    fmt = None if spec.format == "auto" else spec.format
    for item in read_records(spec.path, spec.split, spec.subset):
        if spec.limit is not None and stats.records >= spec.limit:
            break
        stats.records += 1
        if isinstance(item, BadRecord):
            yield stats.records - 1, item.location, item
            continue
        try:
            if fmt is None:
                fmt = detect_format(item.fields, item.location)
                stats.format = fmt
            yield stats.records - 1, item.location, parse_record(item.fields, fmt, item.location)
        except BadRecord as bad:
            yield stats.records - 1, item.location, bad


def _pending_batches(spec: SourceConfig, stats: SourceStats):
    """The source's parsed records in batches of ENCODE_BATCH (bad ones included, in their places)."""
    pending: list = []
    for parsed in _parsed_records(spec, stats):
        pending.append(parsed)
        if len(pending) == ENCODE_BATCH:
            yield pending
            pending = []
    if pending:
        yield pending


def _tokenise_source(spec: SourceConfig, encoder: ChatEncoder, data: DataConfig, emit) -> tuple[int, SourceStats]:
    """Read, parse and tokenise the source in batches (`ChatEncoder.encode_many`, in `data.num_proc` worker
    processes when > 1: data/parallel_encode.py); every CHUNK_ROWS examples go to `emit` as one chunk. Bad records
    are handled in record order, as one at a time would be."""
    stats = SourceStats(spec.name, spec.path, format="" if spec.format == "auto" else spec.format)
    builder = ChunkBuilder()
    batches = deque()  # parsed batches whose encodings are on their way, oldest first

    def to_encode():
        for pending in _pending_batches(spec, stats):
            batches.append(pending)
            yield [(example, location) for _, location, example in pending if not isinstance(example, BadRecord)]

    for encodings in encoded_batches(encoder, to_encode(), data.num_proc):
        pending = batches.popleft()
        encoded = iter(encodings)
        for record, location, example in pending:
            result = example if isinstance(example, BadRecord) else next(encoded)
            try:
                if isinstance(result, BadRecord):
                    raise result
                if all(label == IGNORE_INDEX for label in result.labels[1:]):
                    raise BadRecord(location, "example has no response tokens to learn from")
                fitted = _fit_length(result.input_ids, result.labels, data, stats, location)
            except BadRecord as bad:
                if data.on_bad_record == "error":
                    raise UserError(f"{bad.location}: {bad.problem} (set data.on_bad_record=skip to leave such "
                                    f"records out)") from None
                stats.skipped += 1
                if len(stats.skip_reasons) < 5:
                    stats.skip_reasons.append(str(bad))
                continue
            if fitted is not None:
                builder.add(fitted[0], fitted[1], record)
                stats.examples += 1
                if len(builder) == CHUNK_ROWS:
                    emit(builder.take())
    if len(builder):
        emit(builder.take())
    stats.format = stats.format or spec.format
    if not stats.examples:
        detail = f" ({stats.skipped} bad records skipped, {stats.dropped_too_long} too long)" if stats.records else ""
        raise UserError(f"{spec.path}: source '{spec.name}' has no usable examples{detail}")
    if stats.skipped:
        log.warning("source %s: skipped %d bad records, e.g. %s", spec.name, stats.skipped, stats.skip_reasons[0])
    return stats.examples, stats


def load_pool(sources: list[SourceConfig], encoder: ChatEncoder, data: DataConfig) -> SourcePool:
    chunks: list[list[TokenChunk]] = []
    stats: list[SourceStats] = []
    for source_id, spec in enumerate(sources):
        source_chunks, source_stats = _source_chunks(spec, encoder, data)
        chunks.append(source_chunks)
        stats.append(source_stats)
        log.info("source %d %s: %d examples (%s, %d truncated, %d dropped, %d skipped)", source_id, spec.name,
                 source_stats.examples, source_stats.format, source_stats.truncated,
                 source_stats.dropped_too_long, source_stats.skipped)
    return SourcePool([s.name for s in sources], PoolExamples(chunks), stats)


def read_conversations(spec: SourceConfig, on_bad_record: str = "error") -> list[dict]:
    """The source's records as `messages` conversations; with on_bad_record 'error', index i is record i."""
    fmt = None if spec.format == "auto" else spec.format
    records = []
    for item in read_records(spec.path, spec.split, spec.subset):
        if spec.limit is not None and len(records) >= spec.limit:
            break
        try:
            if isinstance(item, BadRecord):
                raise item
            fmt = fmt or detect_format(item.fields, item.location)
            example = parse_record(item.fields, fmt, item.location)
            if not isinstance(example, Conversation):
                raise UserError(f"{spec.path}: source '{spec.name}' is plain text; mix writes conversations "
                                f"(messages format), so text sources cannot be mixed")
        except BadRecord as bad:
            if on_bad_record == "error":
                raise UserError(f"{bad.location}: {bad.problem}") from None
            continue
        records.append({"messages": [{"role": m.role, "content": m.content} for m in example.messages]})
    if not records:
        raise UserError(f"{spec.path}: source '{spec.name}' has no usable records")
    return records
