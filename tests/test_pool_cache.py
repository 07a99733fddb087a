"""The tokenised-pool cache: a second load equals tokenising again, reads nothing through the tokenizer, and any change
to the files, the tokenizer or the data settings makes a new entry."""

import copy
import json
import os

import pytest

from lmrefinery.config import DataConfig, SourceConfig
from lmrefinery.data import pool_cache
from lmrefinery.data.sources import load_source
from lmrefinery.data.token_columns import ChunkBuilder, PoolExamples
from lmrefinery.data.tokenize import ChatEncoder


def _write(path, count, offset=0):
    with open(path, "w") as handle:
        for i in range(count):
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"add {i + offset} and {i}"},
                                                  {"role": "assistant", "content": str(2 * i + offset)}]}) + "\n")
    return path


def _rows(examples):
    return [(e.input_ids, e.labels, e.source_id, e.record) for e in examples]


class _CountingEncoder(ChatEncoder):
    calls = 0

    def encode_many(self, items):
        _CountingEncoder.calls += len(items)
        return super().encode_many(items)


def _load(path, tokenizer, **data):
    settings = DataConfig(sources=[SourceConfig(name="s", path=str(path))], **data)
    return load_source(settings.sources[0], 2, _CountingEncoder(tokenizer), settings)


def test_second_load_comes_from_the_cache_and_equals_tokenising(tmp_path, tokenizer):
    path = _write(tmp_path / "a.jsonl", 40)
    fresh, fresh_stats = _load(path, tokenizer, cache=False)
    _CountingEncoder.calls = 0
    first, _ = _load(path, tokenizer)
    assert _CountingEncoder.calls == 40
    second, stats = _load(path, tokenizer)
    assert _CountingEncoder.calls == 40  # nothing tokenised the second time
    assert _rows(second) == _rows(first) == _rows(fresh)
    assert stats == fresh_stats


def _tokenised_count(path, tokenizer, **data) -> int:
    """How many records a load tokenised (0: it came from the cache)."""
    _CountingEncoder.calls = 0
    _load(path, tokenizer, **data)
    return _CountingEncoder.calls


def test_changed_settings_files_or_tokenizer_make_a_new_entry(tmp_path, tokenizer):
    path = _write(tmp_path / "a.jsonl", 12)
    assert _tokenised_count(path, tokenizer) == 12
    assert _tokenised_count(path, tokenizer) == 0
    assert _tokenised_count(path, tokenizer, on_bad_record="skip") == 12
    assert _tokenised_count(path, tokenizer, system_prompt="Be brief.") == 12
    assert _tokenised_count(path, tokenizer, system_prompt="Be brief.") == 0
    other_tokenizer = copy.deepcopy(tokenizer)
    other_tokenizer.add_tokens(["zzz-new-token"])  # a changed vocabulary changes the tokenizer's fingerprint
    assert _tokenised_count(path, other_tokenizer) == 12
    _write(path, 12, offset=1000)  # same file, new content (size and mtime change)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    assert _tokenised_count(path, tokenizer) == 12
    assert _rows(_load(path, tokenizer)[0]) == _rows(_load(path, tokenizer, cache=False)[0])


def test_a_damaged_entry_is_rebuilt(tmp_path, tokenizer, caplog):
    path = _write(tmp_path / "a.jsonl", 10)
    reference = _rows(_load(path, tokenizer)[0])  # read now: the file it maps is damaged below
    settings = DataConfig(sources=[SourceConfig(name="s", path=str(path))])
    key = pool_cache.source_key(settings.sources[0], ChatEncoder(tokenizer).fingerprint, settings)
    (pool_cache.cache_directory(key) / "examples.arrow").write_bytes(b"not arrow")
    _CountingEncoder.calls = 0
    rebuilt, _ = _load(path, tokenizer)
    assert _rows(rebuilt) == reference and _CountingEncoder.calls == 10
    assert pool_cache.load_cached(key) is not None  # written again


def test_sources_that_are_not_local_files_are_not_cached(tokenizer):
    settings = DataConfig(sources=[SourceConfig(name="hub", path="org/name")])
    assert pool_cache.source_key(settings.sources[0], "x", settings) is None


@pytest.mark.parametrize("rows_per_chunk", [[1], [5], [3, 0, 4]])
def test_chunks_come_back_from_the_arrow_file_as_written(tmp_path, monkeypatch, rows_per_chunk):
    """Each chunk is one record batch; read back (memory-mapped) every column equals what was written."""
    monkeypatch.setenv("LMREFINERY_CACHE", str(tmp_path))
    written, record = [], 0
    writer = pool_cache.CacheWriter("k")
    for rows in rows_per_chunk:
        builder = ChunkBuilder()
        for _ in range(rows):
            ids = list(range(record, 2 * record + 1))
            builder.add(ids, [-100] + ids[1:], 10 * record)
            written.append((ids, [-100] + ids[1:], 10 * record))
            record += 1
        writer.write(builder.take())
    writer.finish({"n": record})
    chunks, stats = pool_cache.load_cached("k")
    assert stats == {"n": record} and [chunk.rows for chunk in chunks] == rows_per_chunk
    examples = PoolExamples([chunks])
    assert [(e.input_ids, e.labels, e.record) for e in examples] == written
    assert examples.lengths().tolist() == [len(ids) for ids, _, _ in written]


def test_cached_token_rows_are_positioned_reads_of_the_file_equal_to_its_arrow_columns(tmp_path, monkeypatch):
    """A cached chunk's token columns read each row with os.pread at the column's place in the file (not through the
    mapping, whose fault-around made every drawn row cost ~100 KiB of RSS); every slice equals pyarrow's own view of
    the same column, and a file cut short under a run is a clear error, not wrong tokens."""
    import numpy as np
    import pyarrow as pa

    monkeypatch.setenv("LMREFINERY_CACHE", str(tmp_path))
    writer, builder = pool_cache.CacheWriter("k"), ChunkBuilder()
    for record in range(300):
        ids = [(7 * record + j) % 50_000 for j in range(1 + record % 37)]
        builder.add(ids, [-100] + ids[1:], record)
        if len(builder) == 128:
            writer.write(builder.take())
    writer.write(builder.take())
    writer.finish({})
    chunks, _ = pool_cache.load_cached("k")
    path = pool_cache.cache_directory("k") / "examples.arrow"
    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    for index, chunk in enumerate(chunks):
        assert isinstance(chunk.ids, pool_cache.FileColumn) and isinstance(chunk.labels, pool_cache.FileColumn)
        batch = reader.get_batch(index)
        expected_ids = batch.column("input_ids").values.to_numpy()
        expected_labels = batch.column("labels").values.to_numpy()
        for start, end in [(0, len(expected_ids)), (3, 40), (len(expected_ids) - 5, len(expected_ids)), (9, 9)]:
            assert np.array_equal(chunk.ids[start:end], expected_ids[start:end])
            assert np.array_equal(chunk.labels[start:end], expected_labels[start:end])
    os.truncate(path, chunks[-1].ids.byte_offset + 8)
    with pytest.raises(OSError, match="short read"):
        chunks[-1].ids[0:20]
