"""Every record format and file type yields the same ids and labels for the same conversation."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmrefinery.config import DataConfig, SourceConfig
from lmrefinery.data.files import read_records
from lmrefinery.data.formats import detect_format, parse_record
from lmrefinery.data.sources import load_source
from lmrefinery.data.tokenize import ChatEncoder

QUESTION, ANSWER, SYSTEM = "What is two plus three?", "Two plus three is five.", "Answer briefly."

SINGLE_TURN = {
    "alpaca": {"instruction": QUESTION, "output": ANSWER},
    "text2text": {"input": QUESTION, "output": ANSWER},
    "messages": {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]},
    "sharegpt": {"conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}]},
}

MULTI_TURN = {
    "messages": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION},
                              {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "And 1+1?"},
                              {"role": "assistant", "content": "Two."}]},
    "sharegpt": {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": QUESTION},
                                   {"from": "gpt", "value": ANSWER}, {"from": "human", "value": "And 1+1?"},
                                   {"from": "gpt", "value": "Two."}]},
}


def _encode(tokenizer, record, fmt="auto"):
    fmt = detect_format(record, "test") if fmt == "auto" else fmt
    encoded = ChatEncoder(tokenizer).encode(parse_record(record, fmt, "test"), "test")
    return encoded.input_ids, encoded.labels


@pytest.mark.parametrize("records", [SINGLE_TURN, MULTI_TURN], ids=["single-turn", "multi-turn"])
def test_every_format_gives_identical_ids_and_labels(tokenizer, records):
    results = {fmt: _encode(tokenizer, record) for fmt, record in records.items()}
    reference = next(iter(results.values()))
    assert sum(label != -100 for label in reference[1]) > 0
    for fmt, result in results.items():
        assert result == reference, fmt


def test_alpaca_input_and_system_fields(tokenizer):
    alpaca = {"instruction": "Translate.", "input": "hello", "output": "bonjour", "system": SYSTEM}
    messages = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Translate.\n\nhello"},
                             {"role": "assistant", "content": "bonjour"}]}
    assert _encode(tokenizer, alpaca) == _encode(tokenizer, messages)


def test_auto_detection():
    assert {fmt: detect_format(r, "x") for fmt, r in SINGLE_TURN.items()} == {f: f for f in SINGLE_TURN}
    assert detect_format({"text": "plain"}, "x") == "text"


def test_text_format_supervises_every_token(tokenizer):
    ids, labels = _encode(tokenizer, {"text": "The quick brown fox."})
    assert ids == labels and ids[-1] == tokenizer.eos_token_id


def _write_all_file_types(tmp_path, records):
    (tmp_path / "list.json").write_text(json.dumps(records))
    (tmp_path / "instances.json").write_text(json.dumps({"instances": records}))
    (tmp_path / "lines.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "table.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    return ["list.json", "instances.json", "lines.jsonl", "table.parquet", "saved"]


def test_every_file_type_gives_the_same_examples(tmp_path, tokenizer):
    records = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(5)]
    names = _write_all_file_types(tmp_path, records)
    data = DataConfig(sources=[SourceConfig(name="x", path="unused")], max_length=256)
    encoder = ChatEncoder(tokenizer)
    loaded = {}
    for name in names:
        examples, stats = load_source(SourceConfig(name=name, path=str(tmp_path / name)), 3, encoder, data)
        loaded[name] = [(e.input_ids, e.labels, e.source_id) for e in examples]
        assert stats.examples == 5 and stats.format == "alpaca"
    reference = loaded["lines.jsonl"]
    assert all(e[2] == 3 for e in reference)
    for name, examples in loaded.items():
        assert examples == reference, name


def test_record_locations_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [r.location for r in read_records(path)] == [f"{path} line 1", f"{path} line 3"]


def test_truncation_cuts_long_examples_or_drops_them(tmp_path, tokenizer):
    """'truncate' keeps the first max_length tokens (labels cut with them); 'drop' leaves the example out; both count
    what they did."""
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    long = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 60}]}
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (short, long, short)))
    encoder = ChatEncoder(tokenizer)
    full = load_source(SourceConfig(name="x", path=str(path)), 0, encoder,
                       DataConfig(sources=[SourceConfig(name="x", path="unused")], max_length=1024))[0]
    limit = len(full[0].input_ids) + 4
    assert len(full[1].input_ids) > limit
    for mode in ("truncate", "drop"):
        data = DataConfig(sources=[SourceConfig(name="x", path="unused")], max_length=limit, truncation=mode)
        examples, stats = load_source(SourceConfig(name="x", path=str(path)), 0, encoder, data)
        if mode == "truncate":
            assert [len(e.input_ids) for e in examples] == [len(full[0].input_ids), limit, len(full[0].input_ids)]
            assert examples[1].input_ids == full[1].input_ids[:limit] and examples[1].labels == full[1].labels[:limit]
            assert (stats.truncated, stats.dropped_too_long) == (1, 0)
        else:
            assert [e.record for e in examples] == [0, 2] and (stats.truncated, stats.dropped_too_long) == (0, 1)


def test_a_dataset_directory_is_read_through_datasets_with_split_and_record_locations(tmp_path, tokenizer, capsys,
                                                                                       tiny_model_dir):
    """A source `path` may be anything `datasets.load_dataset` reads (a hub id, or — here, offline — a directory of
    data files with its splits); records stream in order and a bad one is named by split and index."""
    from tests.helpers import run_cli, sft_config, write_yaml

    directory = tmp_path / "hub-style"
    directory.mkdir()
    records = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(6)]
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    data = DataConfig(sources=[SourceConfig(name="x", path="unused")], max_length=256)
    encoder = ChatEncoder(tokenizer)
    examples, _ = load_source(SourceConfig(name="hub", path=str(directory)), 0, encoder, data)
    reference, _ = load_source(SourceConfig(name="file", path=str(directory / "train.jsonl")), 0, encoder, data)
    assert [e.input_ids for e in examples] == [e.input_ids for e in reference]
    test_split, _ = load_source(SourceConfig(name="hub", path=str(directory), split="test"), 0, encoder, data)
    assert len(test_split) == 2
    locations = [r.location for r in read_records(directory, split="test")]
    assert locations == [f"{directory} split test record 0", f"{directory} split test record 1"]

    broken = records[:3] + [{"instruction": "No output here."}] + records[3:]
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in broken))
    tree = sft_config(tmp_path, tiny_model_dir, steps=1)
    tree["data"]["sources"][1] = {"name": "hub", "path": str(directory), "split": "train"}
    assert run_cli("sft", "--config", write_yaml(tmp_path / "c.yaml", tree)) == 2
    assert f"{directory} split train record 3: missing field 'output'" in capsys.readouterr().err
