"""The tokenised examples of a source, cached on disk and reused, memory-mapped, by later runs.

Reading and tokenising is the slow part of starting a run on a large source (rendering the chat template of every
record in Python). The result depends only on the source's files, the tokenizer and the data settings, so it is
stored once as an Arrow IPC file (pyarrow; columns input_ids and labels as list<int32>, record as int64; one record
batch per chunk of examples) under `<cache root>/pools/<key>/examples.arrow`, next to the source's statistics, and
memory-mapped when the same key comes again: the pool's columns are views of the file (data/token_columns.py), so
loading costs the offsets, not the tokens. The file is written chunk by chunk while the source is tokenised, so a
first load holds one chunk in memory, not the source.

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

import numpy as np
import pyarrow as pa

from lmrefinery.data.token_columns import TokenChunk
from lmrefinery.fileio import cache_root

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: a datasets.save_to_disk directory read into Python lists

SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("record", pa.int64())])


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


def load_cached(key: str) -> tuple[list[TokenChunk], dict] | None:
    """(chunks, stats) stored under `key` — the chunks views of the file (offsets memory-mapped, tokens read per
    row) — or None when there is no complete entry."""
    directory = cache_directory(key)
    if not (directory / "stats.json").is_file():
        return None
    try:
        stats = json.loads((directory / "stats.json").read_text())
        path = directory / "examples.arrow"
        mapped = pa.memory_map(str(path), "r")
        base_address = mapped.read_buffer(1).address  # where the mapping starts: the columns' addresses are in it
        mapped.seek(0)
        file = _ReadOnlyFile(path, base_address, size=mapped.size())
        reader = pa.ipc.open_file(mapped)
        chunks = [_chunk(reader.get_batch(i), file) for i in range(reader.num_record_batches)]
    except (OSError, ValueError, KeyError) as exc:  # damaged (disk, hand edits; pyarrow's ArrowInvalid is a
        # ValueError): rebuild it
        log.warning("pool cache %s unreadable (%s); tokenising again", directory, str(exc).splitlines()[0])
        shutil.rmtree(directory, ignore_errors=True)
        return None
    return chunks, stats


class _ReadOnlyFile:
    """One open descriptor of a cache file, shared by its columns, closed with the last of them."""

    def __init__(self, path: Path, base_address: int, size: int):
        self.path, self.base_address, self.size = path, base_address, size
        self.fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        if hasattr(self, "fd"):  # os.open may have failed in __init__
            os.close(self.fd)


class FileColumn:
    """An int32 column of the cache file whose rows are read with positioned reads (os.pread), not through the
    memory mapping. Why: a batch draws rows from all over the pool, and each page fault on a mapped file maps the
    pages around it as well (the kernel's fault-around, 64 KiB, which madvise(MADV_RANDOM) does not switch off), so
    every drawn row made ~110 KiB of the file resident: measured on a 1M-example pool, 51 batches of 128 took the
    process from 0.39 to 1.12 GB RSS (0.40 with positioned reads). A positioned read copies only the row's bytes (the kernel's page cache serves it)."""

    def __init__(self, file: _ReadOnlyFile, values: pa.Array):
        data = values.buffers()[1]
        self.file, self.length = file, len(values)
        if self.length == 0:  # an empty chunk's buffer may be absent or anywhere: nothing is ever read from it
            self.byte_offset = 0
        else:
            self.byte_offset = data.address - file.base_address + 4 * values.offset
        if not 0 <= self.byte_offset <= file.size - 4 * self.length:
            raise ValueError(f"a column of {file.path} lies outside the file")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.length)
        if step != 1:
            raise ValueError("a file column is read in contiguous slices")
        size = 4 * max(stop - start, 0)
        data = os.pread(self.file.fd, size, self.byte_offset + 4 * start)
        if len(data) != size:
            raise OSError(f"{self.file.path}: short read (the file changed under the run)")
        return np.frombuffer(data, dtype=np.int32)


def _chunk(batch: pa.RecordBatch, file: _ReadOnlyFile) -> TokenChunk:
    """A record batch's columns: the offsets and records as numpy views of the mapping (read in order, once), the
    token columns as positioned reads of the file (FileColumn). The list offsets index the whole values array."""
    ids, labels = batch.column("input_ids"), batch.column("labels")
    offsets = ids.offsets.to_numpy()
    if not np.array_equal(offsets, labels.offsets.to_numpy()):
        raise ValueError("input_ids and labels rows differ in length")
    return TokenChunk(FileColumn(file, ids.values), FileColumn(file, labels.values), offsets,
                      batch.column("record").to_numpy())


class CacheWriter:
    """Writes one entry chunk by chunk into a temporary directory; `finish` renames it into place (an entry another
    process completed first is kept), `abort` removes it."""

    def __init__(self, key: str):
        self.key = key
        directory = cache_directory(key)
        directory.parent.mkdir(parents=True, exist_ok=True)
        self._temporary = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=directory.parent))
        self._sink = pa.OSFile(str(self._temporary / "examples.arrow"), "wb")
        self._writer = pa.ipc.new_file(self._sink, SCHEMA)

    def write(self, chunk: TokenChunk) -> None:
        offsets = pa.array(chunk.offsets, type=pa.int32())  # a chunk's tokens stay far below 2^31
        self._writer.write_batch(pa.record_batch([
            pa.ListArray.from_arrays(offsets, pa.array(chunk.ids, type=pa.int32())),
            pa.ListArray.from_arrays(offsets, pa.array(chunk.labels, type=pa.int32())),
            pa.array(chunk.records, type=pa.int64())], schema=SCHEMA))

    def finish(self, stats: dict) -> None:
        try:
            self._writer.close()
            self._sink.close()
            (self._temporary / "stats.json").write_text(json.dumps(stats))
            try:
                os.rename(self._temporary, cache_directory(self.key))
            except OSError:  # another process renamed its copy first
                pass
        finally:
            shutil.rmtree(self._temporary, ignore_errors=True)

    def abort(self) -> None:
        try:
            self._writer.close()
            self._sink.close()
        except (OSError, ValueError):
            pass
        shutil.rmtree(self._temporary, ignore_errors=True)
