"""Setup steps every recipe shares: tokenizer + data validated before anything is written, batch geometry."""

from __future__ import annotations

import math

from lmrefinery.config import DataConfig, ModelConfig, SourceConfig
from lmrefinery.data.sources import SourcePool, load_pool
from lmrefinery.data.tokenize import ChatEncoder
from lmrefinery.errors import UserError
from lmrefinery.models import load_tokenizer


def load_data(model: ModelConfig, data: DataConfig, extra: dict[str, list[SourceConfig]] | None = None):
    """Tokenizer, encoder and the training pool (+ named extra pools such as validation), all validated."""
    tokenizer = load_tokenizer(model)
    encoder = ChatEncoder(tokenizer, data.system_prompt)
    pool = load_pool(data.sources, encoder, data)
    extras = {name: load_pool(sources, encoder, data) for name, sources in (extra or {}).items() if sources}
    return tokenizer, pool, extras


def load_cache_with_data(cache_dir: str, tokenizer_model: ModelConfig | None = None):
    """A teacher cache, a tokenizer (the teacher's, or `tokenizer_model`'s — a student's) and the very examples the
    cache was computed on (re-tokenised from the data config in its manifest, checked against its fingerprints)."""
    from lmrefinery.config import validate_config
    from lmrefinery.distill.cache import MANIFEST, TeacherCache

    cache = TeacherCache(cache_dir)
    data = validate_config(DataConfig, cache.manifest["data"], f"{cache_dir}/{MANIFEST} data")
    model = tokenizer_model or validate_config(ModelConfig, cache.manifest["model"], f"{cache_dir}/{MANIFEST} model")
    tokenizer, pool, _ = load_data(model, data)
    cache.check_compatible(tokenizer, pool.examples)
    return cache, tokenizer, pool, data


def accumulation_steps(batch_size: int, micro_batch_size: int, world_size: int, key: str = "train.batch_size") -> int:
    per_pass = micro_batch_size * world_size
    if batch_size % per_pass:
        raise UserError(f"{key}={batch_size} must be a multiple of train.micro_batch_size × processes "
                        f"= {micro_batch_size} × {world_size}")
    return batch_size // per_pass


def total_steps(steps: int | None, epochs: float | None, pool: SourcePool, batch_size: int) -> int:
    if steps is not None:
        return steps
    return max(1, math.ceil((epochs or 1.0) * len(pool.examples) / batch_size))


def source_counts(pool: SourcePool, indices: list[int]) -> dict[str, int]:
    counts = dict.fromkeys(pool.names, 0)
    for index in indices:
        counts[pool.names[pool.examples[index].source_id]] += 1
    return counts
