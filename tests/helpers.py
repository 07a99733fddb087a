"""Running commands in-process (fast) or under torchrun (a real multi-process run) from tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from lmrefinery.cli import main
from lmrefinery.train.run_dir import read_metrics

REPO = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def run_torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), "-m", "lmrefinery", *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


def sft_config(tmp_path: Path, model_dir: Path, **train) -> dict:
    from tests.tiny import messages_records, write_jsonl

    a = write_jsonl(tmp_path / "a.jsonl", messages_records(0, 10))
    b = write_jsonl(tmp_path / "b.jsonl", messages_records(2, 6))
    return {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(model_dir)},
        "data": {"sources": [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}], "max_length": 96},
        "sampling": {"strategy": "uniform"},
        "train": {"steps": 6, "batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 1,
                  "checkpoint_every": 3, "keep_last": 5, **train},
    }
