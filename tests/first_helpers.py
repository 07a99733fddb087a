"""Shared set-up for the FIRST tests: a tiny teacher, its data and its cache."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import run_cli, write_yaml
from tests.tiny import messages_records, write_jsonl


def teacher_config(tmp_path: Path, model_dir: Path, name: str = "cache", **extra) -> Path:
    a = write_jsonl(tmp_path / "a.jsonl", messages_records(0, 9))
    b = write_jsonl(tmp_path / "b.jsonl", messages_records(2, 5))
    tree = {"output_dir": str(tmp_path / name), "model": {"name_or_path": str(model_dir)},
            "data": {"sources": [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}], "max_length": 96},
            "k": 5, "shard_size": 4, "batch_size": 3, "logprob_dtype": "float32"}
    tree.update(extra)
    return write_yaml(tmp_path / f"{name}.yaml", tree)


def make_cache(tmp_path: Path, model_dir: Path, name: str = "cache", **extra) -> Path:
    assert run_cli("teacher", "--config", teacher_config(tmp_path, model_dir, name, **extra)) == 0
    return tmp_path / name
