"""The run directory: config.yaml, metrics.jsonl, checkpoints/, final outputs — and the lock of the live run.

It is created only after config, data and model have all been validated, so a user error leaves nothing behind.
`--resume` continues only what it can continue faithfully: an existing checkpoint, under a config that changes
nothing that decides the trajectory (RESUME_SAFE lists what may change: logging, checkpoint cadence, validation,
saving, and the number of steps).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

import yaml
from pydantic import BaseModel

from lmrefinery.config import dump_config
from lmrefinery.errors import UserError
from lmrefinery.fileio import atomic_write_text, remove_temporaries

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"
RESUME_SAFE = ("resume", "train.log_every", "train.checkpoint_every", "train.keep_last", "train.steps", "validation",
               "save_model", "save_upper_model", "model.device_map", "report_to", "data.cache", "lora.merge")
_held_locks: dict[Path, int] = {}  # run directory → open descriptor holding its lock (release_run_locks, or exit)


def check_output_dir(output_dir: str | Path, resume: bool | str) -> Path:
    """Refuse to mix a new run into an old one; resuming needs the old one and a checkpoint in it. With
    `resume="auto"` either is fine: the run continues from a checkpoint when there is one and starts afresh when
    there is none (what a dead run left without a checkpoint is then replaced)."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: output_dir exists and is a file, not a directory")
    if resume == "auto":
        return path
    has_run = (path / "metrics.jsonl").exists() or (path / "checkpoints").exists()
    if has_run and not resume:
        raise UserError(f"{path}: already holds a run; pass --resume to continue it or choose another output_dir")
    if resume and not any(p.name.startswith("step-") for p in (path / "checkpoints").glob("step-*")):
        raise UserError(f"{path}: --resume, but there is no complete checkpoint here to continue from; run without "
                        f"--resume to start the run afresh")
    return path


def _flatten(tree, prefix: str = "") -> dict[str, object]:
    """Dotted keys to leaf values; list items by index (data.sources.0.path), as overrides name them."""
    if isinstance(tree, dict) and tree:
        items = tree.items()
    elif isinstance(tree, list) and tree:
        items = enumerate(tree)
    else:
        return {prefix[:-1]: tree}
    flat = {}
    for key, value in items:
        flat |= _flatten(value, f"{prefix}{key}.")
    return flat


def changed_keys(output_dir: Path, config: BaseModel) -> list[str]:
    """Keys whose value differs between the run's stored config.yaml and `config`."""
    stored = output_dir / "config.yaml"
    if not stored.exists():
        return []
    old = _flatten(yaml.safe_load(stored.read_text()) or {})
    new = _flatten(config.model_dump(mode="json"))
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key) and key != "output_dir")


def check_resume_config(output_dir: Path, config: BaseModel, resume_step: int) -> list[str]:
    """Refuse (exit 2) a --resume whose config changes the trajectory; return the harmless changes to record."""
    changed = changed_keys(output_dir, config)
    unsafe = [key for key in changed if not any(key == safe or key.startswith(safe + ".") for safe in RESUME_SAFE)]
    steps = getattr(getattr(config, "train", None), "steps", None)
    if "train.steps" in changed and steps is not None and steps < resume_step:
        unsafe.append(f"train.steps (now {steps}, below the checkpoint's step {resume_step})")
    if unsafe:
        raise UserError(f"{output_dir}: --resume with a changed config: {', '.join(unsafe)} would change the run's "
                        f"trajectory from its checkpoint; restore them or start a new run in another output_dir")
    if changed:
        log.info("resuming with changed settings: %s", ", ".join(changed))
    return changed


def lock_run_dir(output_dir: Path) -> None:
    """Hold `output_dir/.lock` until the command ends (release_run_locks) or the process does: a second live run in
    the directory exits 2 naming the holder. The lock is the operating system's (flock), so a run that died leaves
    no stale lock behind. Re-entrant: a process that already holds it (a run started again in-process, e.g. resumed
    after an error) keeps holding it."""
    if output_dir.resolve() in _held_locks:
        return
    path = output_dir / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = path.read_text(encoding="utf-8", errors="replace").strip() or "another process"
        os.close(descriptor)
        raise UserError(f"{output_dir}: a run is live in this directory ({holder}); stop it first (see "
                        f"docs/distributed.md for torchrun jobs) or choose another output_dir") from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    _held_locks[output_dir.resolve()] = descriptor


def release_run_locks() -> None:
    """Give up every run-directory lock this process holds: a command that ended (the CLI, a compare stage) lets the
    next run in its directory start, also from the same process."""
    while _held_locks:
        _, descriptor = _held_locks.popitem()
        os.close(descriptor)  # closing the descriptor releases its flock


def start_run(output_dir: Path, config: BaseModel, is_main: bool) -> None:
    if not is_main:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    lock_run_dir(output_dir)
    remove_temporaries(output_dir)
    remove_temporaries(output_dir / "checkpoints")
    atomic_write_text(output_dir / "config.yaml", dump_config(config))


def _parse_lines(path: Path) -> list[tuple[str, dict]]:
    """metrics.jsonl's lines with their records; a torn last line (a crash mid-write) is dropped, with a log line."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    parsed = []
    for index, line in enumerate(lines):
        try:
            parsed.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if index < len(lines) - 1:
                raise UserError(f"{path} line {index + 1}: not a JSON record (the metrics file is corrupt)") from None
            log.warning("%s: dropping a torn last line (the previous run stopped while writing it)", path)
    return parsed


class MetricsLog:
    """Append-only metrics.jsonl (one JSON object per line), written by rank 0."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None, mirror=None):
        self.path = path
        self.enabled = enabled
        self.mirror = mirror  # e.g. Trackers.log: every record also goes to TensorBoard / W&B
        if enabled and resume_step is not None and path.exists():
            # Lines logged after the checkpoint we resume from describe steps that will be run again.
            kept = [line for line, record in _parse_lines(path) if record.get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, **record) -> None:
        if not self.enabled:
            return
        record.setdefault("time", round(time.time(), 3))
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.mirror is not None:
            self.mirror(record)


def read_metrics(path: Path) -> list[dict]:
    return [record for _, record in _parse_lines(Path(path))]
