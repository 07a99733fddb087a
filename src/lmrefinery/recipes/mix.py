"""`lmrefinery mix`: draw an SFT set of N examples from the sources with the learned weights.

Counts: ⌊N·p_i⌋ from source i, then the N − Σ⌊N·p_i⌋ examples left over go one each to the sources with the largest
fractional parts N·p_i − ⌊N·p_i⌋ (ties: config order) — the largest-remainder rule, so counts sum to N exactly.
Within a source, examples are drawn without replacement (a seeded shuffle) until the source runs out, then with
replacement (seeded). The mixture is shuffled and written as JSONL in `messages` format, with manifest.json.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

from lmrefinery.config import MixConfig, SourceConfig
from lmrefinery.data.files import BadRecord, read_records
from lmrefinery.data.formats import Conversation, detect_format, parse_record
from lmrefinery.data.sampling import read_weights_file
from lmrefinery.errors import UserError
from lmrefinery.fileio import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def mixture_counts(total: int, weights: list[float]) -> list[int]:
    exact = [total * w for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def source_conversations(spec: SourceConfig, on_bad_record: str) -> list[dict]:
    """The source's records as `messages` conversations; with on_bad_record 'error', index i is record i."""
    fmt = None if spec.format == "auto" else spec.format
    records = []
    for item in read_records(spec.path):
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


def _normalised_weights(config: MixConfig, names: list[str]) -> list[float]:
    weights, origin = config.weights, "weights"
    if isinstance(weights, str):
        origin, weights = weights, read_weights_file(weights)
    if sorted(weights) != sorted(names):
        raise UserError(f"{origin}: weights name {sorted(weights)}, but the sources are {names}")
    values = [float(weights[n]) for n in names]
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise UserError(f"{origin}: weights must be non-negative with a positive sum")
    return [v / sum(values) for v in values]


def run(config: MixConfig, resume: bool = False) -> Path:
    names = [s.name for s in config.sources]
    weights = _normalised_weights(config, names)
    pools = [source_conversations(spec, config.on_bad_record) for spec in config.sources]
    counts = mixture_counts(config.num_examples, weights)
    mixture, manifest_sources = [], {}
    for index, (spec, records, count) in enumerate(zip(config.sources, pools, counts)):
        rng = random.Random(config.seed * 1_000_003 + index)
        order = list(range(len(records)))
        rng.shuffle(order)
        unique = order[: min(count, len(records))]
        extra = [rng.randrange(len(records)) for _ in range(count - len(unique))]
        for position in unique + extra:
            mixture.append({**records[position], "source": spec.name})
        manifest_sources[spec.name] = {"weight": weights[index], "count": count, "available": len(records),
                                       "without_replacement": len(unique), "with_replacement": len(extra)}
    random.Random(config.seed).shuffle(mixture)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "mix.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mixture))
    floors = sum(math.floor(config.num_examples * w) for w in weights)
    atomic_write_json(output_dir / "manifest.json", {
        "num_examples": config.num_examples, "seed": config.seed, "sources": manifest_sources,
        "top_up": {"rule": "largest remainder", "examples": config.num_examples - floors},
        "weights_from": config.weights if isinstance(config.weights, str) else "inline"})
    for name, info in manifest_sources.items():
        log.info("%s: %d examples (weight %.4f; %d drawn again after the source ran out)", name, info["count"],
                 info["weight"], info["with_replacement"])
    log.info("wrote %s (%d examples) and manifest.json", output_dir / "mix.jsonl", len(mixture))
    return output_dir
