"""Each kind of bad input exits 2 naming the file and line/record, and leaves no output behind."""

import json

import pytest

from lmrefinery.train.run_dir import read_metrics
from tests.helpers import run_cli, sft_config, write_yaml

GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]})

BAD_FILES = {
    "malformed-json": (GOOD + "\n" + '{"messages": [\n' + GOOD + "\n", "line 2", "malformed JSON"),
    "missing-field": (GOOD + "\n" + GOOD + "\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n",
                      "line 3", "missing field 'content'"),
    "wrong-type": (GOOD + "\n" + json.dumps({"messages": [{"role": "user", "content": 5},
                                                          {"role": "assistant", "content": "x"}]}) + "\n",
                   "line 2", "must be a string, got int"),
    "no-response-tokens": (GOOD + "\n" + json.dumps({"messages": [{"role": "user", "content": "Only a question"}]})
                           + "\n", "line 2", "no assistant turn"),
}


def _config_with_source(tmp_path, model_dir, path):
    config = sft_config(tmp_path, model_dir, steps=1)
    config["data"]["sources"][1]["path"] = str(path)
    return write_yaml(tmp_path / "c.yaml", config)


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_record_exits_2_with_file_and_line(tmp_path, tiny_model_dir, capsys, kind):
    text, where, problem = BAD_FILES[kind]
    path = tmp_path / f"{kind}.jsonl"
    path.write_text(text)
    assert run_cli("sft", "--config", _config_with_source(tmp_path, tiny_model_dir, path)) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path} {where}" in err and problem in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_non_utf8_bytes(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((GOOD + "\n").encode() + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    assert run_cli("sft", "--config", _config_with_source(tmp_path, tiny_model_dir, path)) == 2
    err = capsys.readouterr().err
    assert f"{path} line 2" in err and "not valid UTF-8" in err
    assert not (tmp_path / "run").exists()


def test_missing_file(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "nowhere.jsonl"
    assert run_cli("sft", "--config", _config_with_source(tmp_path, tiny_model_dir, path)) == 2
    assert f"{path}: file not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_empty_source(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    assert run_cli("sft", "--config", _config_with_source(tmp_path, tiny_model_dir, path)) == 2
    assert "source 'b' has no usable examples" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_response_truncated_away(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "long.jsonl"
    long_prompt = json.dumps({"messages": [{"role": "user", "content": "word " * 200},
                                           {"role": "assistant", "content": "ok"}]})
    path.write_text(GOOD + "\n" + long_prompt + "\n")
    assert run_cli("sft", "--config", _config_with_source(tmp_path, tiny_model_dir, path)) == 2
    assert f"{path} line 2: no response tokens left after truncation" in capsys.readouterr().err


def test_skip_mode_counts_bad_records(tmp_path, tiny_model_dir):
    path = tmp_path / "mixed.jsonl"
    path.write_text(BAD_FILES["malformed-json"][0] + json.dumps({"text": 3}) + "\n")
    config = _config_with_source(tmp_path, tiny_model_dir, path)
    assert run_cli("sft", "--config", config, "data.on_bad_record=skip", "data.sources.1.format=messages") == 0
    start = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    stats = start["data_stats"][1]
    assert stats["records"] == 4 and stats["examples"] == 2 and stats["skipped"] == 2
    assert start["source_sizes"] == [10, 2]
