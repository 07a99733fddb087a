"""The tokenised examples of a source, cached on disk with `datasets` and reused by later runs.

Reading and tokenising is the slow part of starting a run on a large source (rendering the chat template of every
record in Python). The result depends only on the source's files, the tokenizer and the data settings, so it is
stored once as an Arrow dataset (`datasets.Dataset.save_to_disk`: columns input_ids, labels, record; memory-mapped
when read back) under `<cache root>/pools/<key>/`, next to the source's statistics, and loaded from there when the
same key comes again.

The key covers: each file's resolved path, size and modification time (what `make` trusts; editing a file changes its
mtime); the source's format, limit, split and subset; the tokenizer's fingerprint (vocabulary, special tokens, chat
template); the data settings that shape examples (system prompt, max_length, truncation, bad-record policy); and this
module's format version. A dataset id read from the Hub is not cached here (datasets caches the download; its
revision is not known up front). Writing goes to a temporary directory renamed into place, so an interrupted write,
or two processes of one torchrun writing at once, never leaves a half cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import datasets
import numpy as np

from lmrefinery.fileio import cache_root

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _files_of(location: Path) -> list[Path]:
    if location.is_file():
        return [location]
    return sorted(path for path in location.rglob("*") if path.is_file())


def _identity(path: Path) -> tuple[str, int, int]:
    """A file as the cache key sees it: where it is, its size and its modification time (one stat)."""
    status = path.stat()
    return str(path.resolve()), status.st_size, status.st_mtime_ns


def source_key(spec, tokenizer_fingerprint: str, data) -> str | None:
    """The cache key of one source under these settings, or None when the source is not a local file or directory."""
    location = Path(spec.path)
    if not location.exists():
        return None
    files = [_identity(path) for path in _files_of(location)]
    described = {
        "version": FORMAT_VERSION, "files": files, "format": spec.format, "limit": spec.limit, "split": spec.split,
        "subset": spec.subset, "tokenizer": tokenizer_fingerprint, "system_prompt": data.system_prompt,
        "max_length": data.max_length, "truncation": data.truncation, "on_bad_record": data.on_bad_record,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def cache_directory(key: str) -> Path:
    return cache_root() / "pools" / key


def load_cached(key: str) -> tuple[list[list[int]], list[list[int]], list[int], dict] | None:
    """(input_ids, labels, records, stats) stored under `key`, or None when there is no complete entry."""
    directory = cache_directory(key)
    if not (directory / "stats.json").is_file():
        return None
    try:
        stats = json.loads((directory / "stats.json").read_text())
        table = datasets.load_from_disk(str(directory / "examples")).data.table
        return _lists(table["input_ids"]), _lists(table["labels"]), table["record"].to_pylist(), stats
    except (OSError, ValueError) as exc:  # damaged (disk, hand edits; pyarrow's errors are ValueErrors): rebuild it
        log.warning("pool cache %s unreadable (%s); tokenising again", directory, str(exc).splitlines()[0])
        shutil.rmtree(directory, ignore_errors=True)
        return None


def _lists(column) -> list[list[int]]:
    """A list<int32> Arrow column as Python lists, through numpy (much faster than to_pylist for millions of rows)."""
    if len(column) == 0:
        return []
    column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy().tolist()
    return [values[start:end] for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def store(key: str, input_ids: list[list[int]], labels: list[list[int]], records: list[int], stats: dict) -> None:
    """Write one entry atomically; an entry another process completed first is kept."""
    directory = cache_directory(key)
    if not input_ids or (directory / "stats.json").is_file():  # (a source without examples is an error anyway)
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32")),
                                  "record": datasets.Value("int64")})
    temporary = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=directory.parent))
    try:
        table = datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels,
                                            "record": np.asarray(records, dtype=np.int64)}, features=features)
        progress_was_on = not datasets.utils.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # a cache write is not a step the user asked for: no bar on stderr
        try:
            table.save_to_disk(str(temporary / "examples"))
        finally:
            if progress_was_on:
                datasets.enable_progress_bars()
        (temporary / "stats.json").write_text(json.dumps(stats))
        try:
            os.rename(temporary, directory)
        except OSError:  # another process renamed its copy first
            pass
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
