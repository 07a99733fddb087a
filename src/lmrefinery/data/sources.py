"""Named data sources, tokenised once, pooled in config order with deterministic source ids."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from lmrefinery.config import DataConfig, SourceConfig
from lmrefinery.data.files import BadRecord, read_records
from lmrefinery.data.formats import Conversation, detect_format, parse_record
from lmrefinery.data.pool_cache import load_cached, source_key, store
from lmrefinery.data.tokenize import IGNORE_INDEX, ChatEncoder
from lmrefinery.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    source_id: int
    record: int = -1  # position of its record in the source file (data selection writes the chosen records back)


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
    """All examples of all sources; `examples[i].source_id` indexes `names`."""

    names: list[str]
    examples: list[TokenizedExample]
    stats: list[SourceStats]

    @property
    def sizes(self) -> list[int]:
        counts = [0] * len(self.names)
        for example in self.examples:
            counts[example.source_id] += 1
        return counts

    def counts(self, indices: list[int]) -> dict[str, int]:
        """How many of the examples at `indices` come from each source (by name)."""
        counts = dict.fromkeys(self.names, 0)
        for index in indices:
            counts[self.names[self.examples[index].source_id]] += 1
        return counts

    def source_indices(self) -> list[list[int]]:
        """Positions in `examples` of each source's examples, in file order."""
        per_source: list[list[int]] = [[] for _ in self.names]
        for index, example in enumerate(self.examples):
            per_source[example.source_id].append(index)
        return per_source


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
        list[TokenizedExample], SourceStats]:
    """The source's examples and statistics: from the pool cache when this source was tokenised before with the same
    files, tokenizer and settings (data/pool_cache.py), else read and tokenised now (and cached)."""
    key = source_key(spec, encoder.fingerprint, data) if data.cache else None
    cached = load_cached(key) if key else None
    if cached is not None:
        input_ids, labels, records, stats = cached
        stats = SourceStats(**{**stats, "name": spec.name, "path": spec.path})
        log.info("source %s: %d tokenised examples from the cache", spec.name, len(input_ids))
        if stats.skipped:
            log.warning("source %s: skipped %d bad records, e.g. %s", spec.name, stats.skipped,
                        stats.skip_reasons[0])
        return [TokenizedExample(ids, labs, source_id, record)
                for ids, labs, record in zip(input_ids, labels, records)], stats
    examples, stats = _tokenise_source(spec, source_id, encoder, data)
    if key:
        store(key, [e.input_ids for e in examples], [e.labels for e in examples], [e.record for e in examples],
              asdict(stats))
    return examples, stats


def _tokenise_source(spec: SourceConfig, source_id: int, encoder: ChatEncoder, data: DataConfig) -> tuple[
        list[TokenizedExample], SourceStats]:
    stats = SourceStats(spec.name, spec.path)
    fmt = None if spec.format == "auto" else spec.format
    examples: list[TokenizedExample] = []
    for item in read_records(spec.path, spec.split, spec.subset):
        if spec.limit is not None and stats.records >= spec.limit:
            break
        stats.records += 1
        try:
            if isinstance(item, BadRecord):
                raise item
            if fmt is None:
                fmt = detect_format(item.fields, item.location)
            encoded = encoder.encode(parse_record(item.fields, fmt, item.location), item.location)
            if all(label == IGNORE_INDEX for label in encoded.labels[1:]):
                raise BadRecord(item.location, "example has no response tokens to learn from")
            fitted = _fit_length(encoded.input_ids, encoded.labels, data, stats, item.location)
        except BadRecord as bad:
            if data.on_bad_record == "error":
                raise UserError(f"{bad.location}: {bad.problem} (set data.on_bad_record=skip to leave such "
                                f"records out)") from None
            stats.skipped += 1
            if len(stats.skip_reasons) < 5:
                stats.skip_reasons.append(str(bad))
            continue
        if fitted is not None:
            examples.append(TokenizedExample(fitted[0], fitted[1], source_id, stats.records - 1))
    stats.format = fmt or spec.format
    stats.examples = len(examples)
    if not examples:
        detail = f" ({stats.skipped} bad records skipped, {stats.dropped_too_long} too long)" if stats.records else ""
        raise UserError(f"{spec.path}: source '{spec.name}' has no usable examples{detail}")
    if stats.skipped:
        log.warning("source %s: skipped %d bad records, e.g. %s", spec.name, stats.skipped, stats.skip_reasons[0])
    return examples, stats


def load_pool(sources: list[SourceConfig], encoder: ChatEncoder, data: DataConfig) -> SourcePool:
    examples: list[TokenizedExample] = []
    stats: list[SourceStats] = []
    for source_id, spec in enumerate(sources):
        loaded, source_stats = load_source(spec, source_id, encoder, data)
        examples.extend(loaded)
        stats.append(source_stats)
        log.info("source %d %s: %d examples (%s, %d truncated, %d dropped, %d skipped)", source_id, spec.name,
                 source_stats.examples, source_stats.format, source_stats.truncated,
                 source_stats.dropped_too_long, source_stats.skipped)
    return SourcePool([s.name for s in sources], examples, stats)


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
