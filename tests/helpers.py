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


def torchrun(nproc: int, *args, extra_path: Path | None = None, environment: dict | None = None,
             timeout: int = 300) -> subprocess.CompletedProcess:
    """`nproc` processes running a script (`path args`) or a module (`-m name args`) from this checkout, with
    `extra_path` first on PYTHONPATH when given."""
    path = os.pathsep.join(str(p) for p in (extra_path, REPO, REPO / "src") if p is not None)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **(environment or {}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def run_torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return torchrun(nproc, "-m", "lmrefinery", *args, timeout=timeout)


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


def run_one_and_two_processes(tmp_path: Path, command: str, config: dict) -> tuple[Path, Path]:
    """The same config run in-process and under a 2-process torchrun; returns both output directories."""
    single, double = tmp_path / "single", tmp_path / "double"
    assert run_cli(command, "--config", write_yaml(tmp_path / "single.yaml", dict(config, output_dir=str(single)))) == 0
    result = run_torchrun(2, command, "--config", write_yaml(tmp_path / "double.yaml",
                                                             dict(config, output_dir=str(double))))
    assert result.returncode == 0, result.stderr[-3000:]
    return single, double


def final_weights(run_dir: Path, step: int, name: str = "model") -> dict:
    from lmrefinery.train.checkpoint_load import full_tensors

    return full_tensors(run_dir / "checkpoints" / f"step-{step}", f"module/{name}/")


def cut_back(run: Path, kept_step: int, later_outputs: tuple[str, ...]) -> None:
    """Make a finished run look killed right after checkpoint `kept_step`: later checkpoints and outputs gone."""
    import shutil

    from lmrefinery.train.checkpoint_format import checkpoint_steps

    for step in checkpoint_steps(run):
        if step > kept_step:
            shutil.rmtree(run / "checkpoints" / f"step-{step}")
    for name in later_outputs:
        path = run / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def resumed_after_kill(tmp_path: Path, command: str, config: dict, kept_step: int, final_step: int,
                       later_outputs: tuple[str, ...]) -> tuple[Path, Path]:
    """Run `config` uninterrupted and again; then make the second look killed right after checkpoint `kept_step`
    (later checkpoints and `later_outputs` gone) and resume it. Returns (resumed run, uninterrupted run)."""
    from lmrefinery.train.checkpoint_format import checkpoint_steps

    reference = tmp_path / "uninterrupted"
    assert run_cli(command, "--config", write_yaml(tmp_path / "ref.yaml", dict(config, output_dir=str(reference)))) == 0
    run = Path(config["output_dir"])
    assert run_cli(command, "--config", write_yaml(tmp_path / "run.yaml", config)) == 0
    cut_back(run, kept_step, later_outputs)
    assert checkpoint_steps(run) == [s for s in checkpoint_steps(reference) if s <= kept_step]
    assert run_cli(command, "--config", tmp_path / "run.yaml", "--resume") == 0
    assert checkpoint_steps(run)[-1] == final_step
    return run, reference
