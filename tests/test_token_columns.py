"""The pool as columns (memory-mapped from the cache, or built in memory) holds exactly the examples that encoding the
records one at a time gives; batched encoding equals one call per example; samplers draw and resume over it as over
lists of indices."""

import json

import pytest

from lmrefinery.config import DataConfig, SamplingConfig, SourceConfig
from lmrefinery.data import sources as sources_module
from lmrefinery.data.formats import Conversation, Message, PlainText, parse_record
from lmrefinery.data.sampling import MixtureSampler
from lmrefinery.data.sources import load_pool
from lmrefinery.data.tokenize import IGNORE_INDEX, ChatEncoder
from lmrefinery.errors import UserError
from tests.tiny import tiny_tokenizer


def _conversation(*turns):
    return Conversation(tuple(Message(role, content) for role, content in turns))


EXAMPLES = [
    _conversation(("user", "What is two plus three?"), ("assistant", "Five.")),
    PlainText("a plain text example about sources"),
    _conversation(("system", "Be brief."), ("user", "Capital of France?"), ("assistant", "Paris."),
                  ("user", "And of Italy?"), ("assistant", "Rome.")),
    _conversation(("user", "Only a question"), ("assistant", "")),
    _conversation(("user", "add 12 and 30"), ("assistant", "42")),
]


@pytest.mark.parametrize("template", [True, False], ids=["chat template", "fallback format"])
@pytest.mark.parametrize("system_prompt", [None, "You count."])
def test_encoding_a_batch_equals_encoding_one_at_a_time(template, system_prompt):
    encoder = ChatEncoder(tiny_tokenizer() if template else tiny_tokenizer(chat_template=None), system_prompt)
    items = [(example, f"f.jsonl:{i + 1}") for i, example in enumerate(EXAMPLES)]
    batched = encoder.encode_many(items)
    single = [encoder.encode_many([item])[0] for item in items]
    assert batched == single
    if template:  # and one at a time is what apply_chat_template itself tokenises
        messages = [{"role": m.role, "content": m.content} for m in EXAMPLES[2].messages]
        assert batched[2].input_ids == list(encoder.tokenizer.apply_chat_template(messages, tokenize=True,
                                                                                  return_dict=False))
        assert batched[1].input_ids == encoder.tokenizer("a plain text example about sources")["input_ids"] + [
            encoder.eos_id]


def _write_sources(tmp_path):
    """Three sources crossing every boundary: a messages file with a bad record and over-long examples, a text file,
    an alpaca file; 23 usable examples in all."""
    rows = {
        "chat.jsonl": [{"messages": [{"role": "user", "content": f"add {i} and {i + 1}"},
                                     {"role": "assistant", "content": str(2 * i + 1) + " and more" * (i % 4)}]}
                       for i in range(11)],
        "text.jsonl": [{"text": f"plain text number {i} " * (1 + i % 3)} for i in range(7)],
        "alpaca.jsonl": [{"instruction": f"name {i}", "output": f"number {i}"} for i in range(5)],
    }
    rows["chat.jsonl"].insert(4, {"nothing": "usable"})  # skipped, and the record numbers after it shift
    specs = []
    for name, records in rows.items():
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        specs.append(SourceConfig(name=name.split(".")[0], path=str(path)))
    return specs


def _reference(specs, encoder, max_length):
    """The examples one at a time: each record parsed and encoded alone, truncated to max_length."""
    rows = []
    for source_id, spec in enumerate(specs):
        lines = open(spec.path).read().splitlines()
        fmt = "messages" if "chat" in spec.name else spec.name
        for record, line in enumerate(lines):
            fields = json.loads(line)
            if "nothing" in fields:
                continue
            encoded = encoder.encode(parse_record(fields, fmt, "x"), "x")
            rows.append((encoded.input_ids[:max_length], encoded.labels[:max_length], source_id, record))
    return rows


def _rows(examples):
    return [(e.input_ids, e.labels, e.source_id, e.record) for e in examples]


@pytest.mark.parametrize("cache", [True, False], ids=["memory-mapped cache", "in memory"])
def test_the_column_pool_holds_exactly_the_examples_encoded_one_at_a_time(tmp_path, monkeypatch, tokenizer, cache):
    monkeypatch.setattr(sources_module, "CHUNK_ROWS", 4)  # chunks and encode batches end mid-source
    monkeypatch.setattr(sources_module, "ENCODE_BATCH", 3)
    specs = _write_sources(tmp_path)
    data = DataConfig(sources=specs, max_length=64, on_bad_record="skip", cache=cache)
    encoder = ChatEncoder(tokenizer)
    expected = _reference(specs, encoder, 64)
    pools = [load_pool(specs, encoder, data) for _ in range(2)]  # with the cache: written, then read back
    for pool in pools:
        assert _rows(pool.examples) == expected
        assert [_rows([pool.examples[i]]) for i in range(len(expected))] == [[row] for row in expected]
        assert _rows(pool.examples[-3:]) == expected[-3:] and _rows([pool.examples[-1]]) == expected[-1:]
        assert pool.sizes == [11, 7, 5] == [sum(1 for r in expected if r[2] == s) for s in range(3)]
        assert [list(r) for r in pool.source_indices()] == [list(range(0, 11)), list(range(11, 18)),
                                                            list(range(18, 23))]
        assert pool.lengths().tolist() == [len(r[0]) for r in expected]
        assert pool.counts([0, 12, 19, 20]) == {"chat": 1, "text": 1, "alpaca": 2}
        assert pool.stats[0].skipped == 1 and pool.stats[0].truncated == sum(
            1 for r in expected[:11] if len(r[0]) == 64) > 0
        with pytest.raises(IndexError):
            pool.examples[23]
    assert [vars(s) for s in pools[0].stats] == [vars(s) for s in pools[1].stats]
    assert any(label == IGNORE_INDEX for row in expected for label in row[1])  # prompts are masked


@pytest.mark.parametrize("strategy", ["proportional", "weights", "stratified"])
def test_samplers_draw_and_resume_over_the_column_pool_as_over_index_lists(tmp_path, tokenizer, strategy):
    specs = _write_sources(tmp_path)
    pool = load_pool(specs, ChatEncoder(tokenizer), DataConfig(sources=specs, on_bad_record="skip"))
    settings = SamplingConfig(strategy=strategy,
                              weights={"chat": 0.5, "text": 0.2, "alpaca": 0.3} if strategy == "weights" else None)
    over_ranges = MixtureSampler.build(settings, pool.names, pool.source_indices(), 6, seed=4)
    over_lists = MixtureSampler.build(settings, pool.names, [list(r) for r in pool.source_indices()], 6, seed=4)
    drawn = [over_ranges.next_batch() for _ in range(30)]
    assert drawn == [over_lists.next_batch() for _ in range(30)]
    assert all(type(i) is int for batch in drawn for i in batch)  # JSON-able, like the indices of a list
    interrupted = MixtureSampler.build(settings, pool.names, pool.source_indices(), 6, seed=4)
    for _ in range(13):
        interrupted.next_batch()
    resumed = MixtureSampler.build(settings, pool.names, pool.source_indices(), 6, seed=4)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    assert [resumed.next_batch() for _ in range(17)] == drawn[13:]


def test_tokenising_in_worker_processes_gives_the_same_pool(tmp_path, monkeypatch, tokenizer):
    """data.num_proc = 2: batches encoded in spawned workers, several in flight, come back in order — the same
    examples, record numbers, skips and stats as encoding here."""
    monkeypatch.setattr(sources_module, "CHUNK_ROWS", 4)
    monkeypatch.setattr(sources_module, "ENCODE_BATCH", 2)  # many batches in flight at once
    specs = _write_sources(tmp_path)
    encoder = ChatEncoder(tokenizer)
    here = load_pool(specs, encoder, DataConfig(sources=specs, max_length=64, on_bad_record="skip", cache=False))
    workers = load_pool(specs, encoder, DataConfig(sources=specs, max_length=64, on_bad_record="skip", cache=False,
                                                   num_proc=2))
    assert _rows(workers.examples) == _rows(here.examples) == _reference(specs, encoder, 64)
    assert [vars(s) for s in workers.stats] == [vars(s) for s in here.stats]
    with pytest.raises(UserError, match="line"):  # the first bad record stops the load, workers and all
        load_pool(specs, encoder, DataConfig(sources=specs, max_length=64, cache=False, num_proc=2))
