"""Saving checkpoints `checkpoints/step-N/`: model, optimizer, scheduler, RNG of every rank, data position.

Sharded: every tensor (weights, optimizer slots, ScaleBiO's λ and its optimizer) goes through
torch.distributed.checkpoint with its safetensors storage — each rank writes only its own shards, in parallel, to its
own `shard-0000R-….safetensors` (under FSDP2 a rank holds 1/N of every parameter; nothing is gathered), and each
shard records its offsets in the full tensor, so a checkpoint reloads at any number of processes
(checkpoint_load.py). Everything that is not a tensor (the optimizers' hyper-parameters, the samplers, LISA, the step)
is JSON in `state.json`; each rank's RNG state is `rng-rank<R>.json`.

Written into a temporary directory and renamed once every rank has finished, so a directory named step-N is always
complete; each rank hashes the files it wrote and rank 0 writes `checksums.json` last, before the rename
(checkpoint_format.py says how resuming verifies it and falls back to the previous one). Nothing in a checkpoint is
unpickled: a checkpoint directory someone hands you cannot run code on `--resume`. A write that fails (a full disk, a
file-size limit) stops the run with one line and leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from lmrefinery.errors import UserError
from lmrefinery.fileio import file_sha256
from lmrefinery.train.checkpoint_format import (CHECKSUMS, FORMAT, LOCAL, checkpoint_steps, local_options,
                                                one_process_is_intended, single_process, write_checksums)
from lmrefinery.train.distributed import DistEnv, all_gather_object, barrier, broadcast_object, local_shard
from lmrefinery.train.rng import rng_state
from lmrefinery.train.state_tree import split_tensors


def _module_tensors(name: str, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """A module's state as checkpoint tensors `module/<name>/<fqn>` and its layout (keys; tied names stored once)."""
    state = get_model_state_dict(module, options=local_options(module))
    tensors, aliases, seen = {}, {}, {}
    for fqn, tensor in state.items():
        local = local_shard(tensor)
        identity = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape), local.stride())
        if local.numel() and identity in seen:  # a tied weight (the head sharing the embedding): one copy on disk
            aliases[fqn] = seen[identity]
            continue
        seen[identity] = fqn
        tensors[f"module/{name}/{fqn}"] = tensor
    return tensors, {"keys": [key.split("/", 2)[2] for key in tensors], "aliases": aliases}


def _first_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write, also when torch.distributed.checkpoint wrapped it (per rank)."""
    if isinstance(exc, OSError):
        return exc
    for failure in getattr(exc, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, OSError):
            return inner
    return None


def _own_files(directory: Path, env: DistEnv) -> list[Path]:
    """The files this rank wrote: its shard of the tensors (the storage writer numbers shards from 1) and its RNG."""
    return sorted(directory.glob(f"shard-{env.rank + 1:05d}-*.safetensors")) + [directory / f"rng-rank{env.rank}.json"]


def save_checkpoint(run_dir: Path, step: int, env: DistEnv, modules: dict[str, nn.Module],
                    optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]], state: dict,
                    keep_last: int, objects: dict | None = None, protect: int | None = None) -> Path:
    """Save named modules and (module, optimizer) pairs plus JSON-able `state` as checkpoints/step-`step`.

    `objects` (small, replicated, possibly holding tensors — e.g. ScaleBiO's logits and their optimizer) come back
    as state["objects"]. The newest `keep_last` checkpoints are kept, and step `protect` whatever its age.
    Collective: every rank calls it.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step}"
    partial = root / f".step-{step}.tmp-partial"
    tensors: dict[str, torch.Tensor] = {}
    layout: dict = {"format": FORMAT, "modules": {}, "optimizers": {}, "objects": None}
    for name, module in modules.items():
        module_tensors, layout["modules"][name] = _module_tensors(name, module)
        tensors.update(module_tensors)
    for name, (module, optimizer) in optimizers.items():
        layout["optimizers"][name], optimizer_tensors = split_tensors(
            get_optimizer_state_dict(module, optimizer, options=LOCAL), f"optimizer/{name}")
        tensors.update(optimizer_tensors)
    if objects is not None:
        layout["objects"], object_tensors = split_tensors(objects, "objects")
        tensors.update(object_tensors)
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
            # every rank its own file; no process group in a single process (the writer then runs locally)
            with one_process_is_intended():
                dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(partial), save_distributed=True),
                         no_dist=single_process())
            (partial / f"rng-rank{env.rank}.json").write_text(json.dumps(rng_state()))
            if env.is_main:
                (partial / "state.json").write_text(json.dumps({"step": step, "world_size": env.world_size,
                                                                **state, "layout": layout}, indent=2))
        except (OSError, CheckpointException) as exc:
            failure = _first_os_error(exc) or exc
            if not isinstance(failure, OSError):
                raise
    failures = all_gather_object(failure, env)
    failure = next((f for f in failures if f is not None), None)
    if failure is None:  # each rank hashes what it wrote, in parallel
        try:
            digests = {path.name: file_sha256(path) for path in _own_files(partial, env)}
        except OSError as exc:
            failure, digests = exc, {}
        gathered = all_gather_object((failure, digests), env)
        failure = next((f for f, _ in gathered if f is not None), None)
    if failure is not None:
        barrier(env)
        if env.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        kept = checkpoint_steps(run_dir)
        raise UserError(f"{getattr(failure, 'filename', None) or partial}: cannot write checkpoint step {step} "
                        f"({failure.strerror or failure}); "
                        + (f"step {kept[-1]} is intact: fix the cause and --resume" if kept else "no checkpoint yet"))
    if env.is_main:
        try:
            sums = {name: digest for _, rank_digests in gathered for name, digest in rank_digests.items()}
            write_checksums(partial, sums | {"state.json": file_sha256(partial / "state.json")})
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
