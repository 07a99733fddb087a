"""What a checkpoint directory `checkpoints/step-N/` holds, and how it proves itself complete and intact.

Files: `shard-0000R-model-00001-of-00001.safetensors` (rank R-1's shards of every tensor, written by
torch.distributed.checkpoint's safetensors storage), `state.json` (everything that is not a tensor, with the layout
that puts the tensors back in place), `rng-rank<R>.json` (each rank's RNG state), and `checksums.json`, written last:
the SHA-256 of every other file. The newest step directory whose files match their checksums is the one `--resume`
uses; one that fails is named in one line and skipped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions

from lmrefinery.errors import UserError
from lmrefinery.fileio import file_sha256
from lmrefinery.models.lora import is_peft_model
from lmrefinery.train.distributed import DistEnv, broadcast_object

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d+)$")
CHECKSUMS = "checksums.json"
FORMAT = "dcp-safetensors-1"
# Each rank's own shards (DTensors under FSDP2, the whole tensors in one process). A LoRA model's checkpoint holds its
# adapters only: the frozen base is the model it was loaded from.
LOCAL = StateDictOptions()
LOCAL_ADAPTERS = StateDictOptions(ignore_frozen_params=True)


def single_process() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextmanager
def one_process_is_intended():
    """torch.distributed.checkpoint warns at every save and load without a process group; one process is a normal
    run here, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*assuming the intent is to (save|load) in a single process")
        yield


def local_options(module: nn.Module) -> StateDictOptions:
    return LOCAL_ADAPTERS if is_peft_model(module) else LOCAL


def checkpoint_steps(run_dir: Path) -> list[int]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for m in (STEP_DIR.match(p.name) for p in root.iterdir()) if m)


def read_checkpoint_state(directory: Path) -> dict:
    """The JSON state of a checkpoint (step, scheduler, data position, LISA, ...).

    Restore anything that decides which parameters are trainable (LISA's active blocks) from it *before*
    load_checkpoint: the state-dict API restores optimizer state only for parameters that require grad.
    """
    return json.loads((Path(directory) / "state.json").read_text())


def write_checksums(directory: Path, sums: dict[str, str] | None = None) -> None:
    """The SHA-256 of every file of a checkpoint directory (computed here unless given), written last, atomically."""
    if sums is None:
        sums = {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    temporary = directory / f".{CHECKSUMS}.tmp"
    temporary.write_text(json.dumps(dict(sorted(sums.items())), indent=1))
    os.replace(temporary, directory / CHECKSUMS)


def checkpoint_problem(directory: Path) -> str | None:
    """Why a checkpoint cannot be trusted (a missing, changed or unlisted file; no checksum record), or None."""
    record = directory / CHECKSUMS
    try:
        sums = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return f"{record}: missing or unreadable, so the checkpoint's files cannot be verified"
    for name, expected in sums.items():
        path = directory / name
        if not path.is_file():
            return f"{path}: missing"
        if file_sha256(path) != expected:
            return f"{path}: does not match its checksum (changed or damaged since it was written)"
    unlisted = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in sums and p.name != CHECKSUMS)
    if unlisted:
        return f"{directory / unlisted[0]}: not in {CHECKSUMS} (added after the checkpoint was written)"
    return None


def latest_checkpoint(run_dir: Path, env: DistEnv) -> Path | None:
    """The newest checkpoint whose files match their checksums (rank 0 verifies; every rank gets its answer). A
    newer one that fails is named in one line and skipped; when every one fails, exit 2 naming the newest's file."""
    verdict = None
    if env.is_main:
        problems = []
        for step in reversed(checkpoint_steps(run_dir)):
            directory = Path(run_dir) / "checkpoints" / f"step-{step}"
            problem = checkpoint_problem(directory)
            if problem is None:
                verdict = ("ok", step)
                break
            problems.append(problem)
            log.warning("%s; checkpoint step %d is not used", problem, step)
        if verdict is None:
            verdict = ("none", None) if not problems else ("failed", problems[0])
    kind, value = broadcast_object(verdict, env)
    if kind == "failed":
        raise UserError(f"{value}; no earlier checkpoint verifies either, so the run cannot continue from one: "
                        f"restore the file or start afresh in another output_dir")
    return Path(run_dir) / "checkpoints" / f"step-{value}" if kind == "ok" else None

