"""Checkpoints `checkpoints/step-N/`: model, optimizer, scheduler, RNG of every rank, data position.

Written into a temporary directory and renamed, so a directory named step-N is always complete; the newest complete
one is what `--resume` uses. Model and optimizer are saved as full (unsharded) state dicts through
torch.distributed.checkpoint's state-dict API, which works the same for plain modules and FSDP2-sharded ones.

Each checkpoint proves itself: `checksums.json`, written last (atomically, inside the directory before it is renamed),
holds the SHA-256 of every other file. Resuming verifies the newest checkpoint against it and, when a file has rotted
(a flipped bit, a truncated file on a network disk) or the record is missing, says so in one line and falls back to
the previous complete checkpoint; with none left it exits 2 naming the file.

Nothing in a checkpoint needs unpickling of arbitrary objects: weights are safetensors, the JSON state and each
rank's RNG state are JSON, and the optimizer state (tensors, numbers, strings, lists, dicts) is read with
`torch.load(weights_only=True)`, which refuses anything else — a checkpoint directory someone hands you cannot run
code on `--resume`. A write that fails (a full disk, a file-size limit) stops the run with one line and leaves the
previous checkpoint as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from lmrefinery.errors import UserError
from lmrefinery.models.lora import is_peft_model
from lmrefinery.train.distributed import DistEnv, all_gather_object, barrier, broadcast_object

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d+)$")
CHECKSUMS = "checksums.json"
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
# Optimizer state may legitimately be absent for trainable parameters: LISA frees it for inactive blocks, and a block
# activated at a checkpoint boundary has none yet.
SCATTER_OPTIMIZER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False, strict=False)
# A LoRA model's checkpoint holds its adapters only: the frozen base is the model it was loaded from.
GATHER_ADAPTERS = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
SCATTER_ADAPTERS = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False, strict=False)


def _gather_options(module: nn.Module) -> StateDictOptions:
    return GATHER_ADAPTERS if is_peft_model(module) else GATHER


def _scatter_options(module: nn.Module) -> StateDictOptions:
    return SCATTER_ADAPTERS if is_peft_model(module) else SCATTER


def rng_state() -> dict:
    """Every RNG this process draws from, as plain JSON."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def load_plain(path: Path):
    """torch.load of optimizer state or small objects, refusing anything but tensors and plain Python values."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path}: refused to load: it holds more than tensors and plain values "
                        f"({str(exc).splitlines()[0][:160]})") from None
    except (RuntimeError, EOFError) as exc:
        raise UserError(f"{path}: not a readable checkpoint file ({str(exc).splitlines()[0][:160]})") from None


def seed_everything(seed: int, rank: int = 0) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def checkpoint_steps(run_dir: Path) -> list[int]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for m in (STEP_DIR.match(p.name) for p in root.iterdir()) if m)


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied embeddings); store shared ones as their own copies."""
    seen: set[tuple[int, int]] = set()
    result = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        result[name] = tensor.clone() if key in seen else tensor.contiguous()
        seen.add(key)
    return result


def save_checkpoint(run_dir: Path, step: int, env: DistEnv, modules: dict[str, nn.Module],
                    optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]], state: dict,
                    keep_last: int, objects: dict | None = None, protect: int | None = None) -> Path:
    """Save named modules and (module, optimizer) pairs plus JSON-able `state` as checkpoints/step-`step`.

    `objects` (small, replicated, possibly holding tensors — e.g. ScaleBiO's logits and their optimizer) is saved
    by rank 0 with torch.save and comes back as state["objects"]. The newest `keep_last` checkpoints are kept, and
    step `protect` whatever its age.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step}"
    partial = root / f".step-{step}.tmp-partial"
    model_states = {name: get_model_state_dict(module, options=_gather_options(module))
                    for name, module in modules.items()}
    optimizer_states = {name: get_optimizer_state_dict(module, optimizer, options=GATHER)
                        for name, (module, optimizer) in optimizers.items()}
    failure = None
    if env.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        try:
            partial.mkdir(parents=True)
        except OSError as exc:
            failure = exc
    failure = broadcast_object(failure, env)
    if failure is None:
        try:
            (partial / f"rng-rank{env.rank}.json").write_text(json.dumps(rng_state()))
            if env.is_main:
                for name, model_state in model_states.items():
                    save_file(_unshared(model_state), str(partial / f"{name}.safetensors"))
                for name, optimizer_state in optimizer_states.items():
                    torch.save(optimizer_state, partial / f"{name}-optimizer.pt")
                (partial / "state.json").write_text(json.dumps({"step": step, "world_size": env.world_size,
                                                                **state}, indent=2))
                if objects is not None:
                    torch.save(objects, partial / "objects.pt")
        except OSError as exc:
            failure = exc
    failures = all_gather_object(failure, env)
    failure = next((f for f in failures if f is not None), None)
    if failure is not None:
        barrier(env)
        if env.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        kept = checkpoint_steps(run_dir)
        raise UserError(f"{getattr(failure, 'filename', None) or partial}: cannot write checkpoint step {step} "
                        f"({failure.strerror or failure}); "
                        + (f"step {kept[-1]} is intact: fix the cause and --resume" if kept else "no checkpoint yet"))
    barrier(env)  # every rank's files are in place before they are summed
    if env.is_main:
        try:
            write_checksums(partial)
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise UserError(f"{partial / CHECKSUMS}: cannot write checkpoint step {step} ({exc.strerror or exc})") \
                from None
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in checkpoint_steps(run_dir)[:-keep_last]:
            if old == protect:  # the best-validation checkpoint (train.keep_best) stays
                continue
            shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    barrier(env)
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: Path) -> None:
    """The SHA-256 of every file of a checkpoint directory, written last and atomically."""
    sums = {p.name: _sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    temporary = directory / f".{CHECKSUMS}.tmp"
    temporary.write_text(json.dumps(sums, indent=1))
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
        if _sha256(path) != expected:
            return f"{path}: does not match its checksum (changed or damaged since it was written)"
    unlisted = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in sums and p.name != CHECKSUMS)
    if unlisted:
        return f"{directory / unlisted[0]}: not in {CHECKSUMS} (added after the checkpoint was written)"
    return None


def _drop_state_not_in(module: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Loading initialises state (a zero-gradient step: step = 1, zero moments) for every trainable parameter; a
    parameter that had no state when saved (a block LISA had just activated) must come back with none."""
    saved_names = set(saved.get("state", {}))
    for name, parameter in module.named_parameters():
        if name not in saved_names:
            optimizer.state.pop(parameter, None)


def read_checkpoint_state(directory: Path) -> dict:
    """The JSON state of a checkpoint (step, scheduler, data position, LISA, ...).

    Restore anything that decides which parameters are trainable (LISA's active blocks) from it *before*
    load_checkpoint: the state-dict API restores optimizer state only for parameters that require grad.
    """
    return json.loads((Path(directory) / "state.json").read_text())


def load_checkpoint(directory: Path, env: DistEnv, modules: dict[str, nn.Module],
                    optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]]) -> dict:
    """Restore what save_checkpoint wrote into live (possibly sharded) modules; return the JSON state."""
    load_module_weights(directory, modules)
    for name, (module, optimizer) in optimizers.items():
        optimizer_state = load_plain(directory / f"{name}-optimizer.pt")
        set_optimizer_state_dict(module, optimizer, optimizer_state, options=SCATTER_OPTIMIZER)
        _drop_state_not_in(module, optimizer, optimizer_state)
    state = read_checkpoint_state(directory)
    if (directory / "objects.pt").exists():
        state["objects"] = load_plain(directory / "objects.pt")
    rng_file = directory / f"rng-rank{env.rank}.json"
    if state.get("world_size") == env.world_size:
        if not rng_file.exists():
            raise UserError(f"{directory}: no {rng_file.name} (a checkpoint of an earlier version, whose RNG state was "
                            f"pickled): the run cannot continue identically; start it again without --resume")
        set_rng_state(json.loads(rng_file.read_text()))
    return state


def load_module_weights(directory: Path, modules: dict[str, nn.Module]) -> None:
    """Only the weights of a checkpoint's modules (e.g. the best-validation step's, to save as the final model)."""
    for name, module in modules.items():
        set_model_state_dict(module, load_file(str(directory / f"{name}.safetensors")),
                             options=_scatter_options(module))


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
