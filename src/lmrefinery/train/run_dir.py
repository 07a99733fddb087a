"""The run directory: config.yaml, metrics.jsonl, checkpoints/, final outputs.

It is created only after config, data and model have all been validated, so a user error leaves nothing behind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import BaseModel

from lmrefinery.config import dump_config
from lmrefinery.errors import UserError
from lmrefinery.fileio import atomic_write_text, remove_temporaries


def check_output_dir(output_dir: str | Path, resume: bool) -> Path:
    """Refuse to mix a new run into an old one; resuming needs the old one."""
    path = Path(output_dir)
    has_run = (path / "metrics.jsonl").exists() or (path / "checkpoints").exists()
    if has_run and not resume:
        raise UserError(f"{path}: already holds a run; pass --resume to continue it or choose another output_dir")
    return path


def start_run(output_dir: Path, config: BaseModel, is_main: bool) -> None:
    if not is_main:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(output_dir)
    remove_temporaries(output_dir / "checkpoints")
    atomic_write_text(output_dir / "config.yaml", dump_config(config))


class MetricsLog:
    """Append-only metrics.jsonl (one JSON object per line), written by rank 0."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None):
        self.path = path
        self.enabled = enabled
        if enabled and resume_step is not None and path.exists():
            # Lines logged after the checkpoint we resume from describe steps that will be run again.
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, **record) -> None:
        if not self.enabled:
            return
        record.setdefault("time", round(time.time(), 3))
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
