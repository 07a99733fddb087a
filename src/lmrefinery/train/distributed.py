"""One process by default; under torchrun, data parallel with FSDP2 (`fully_shard` per decoder block).

gloo on CPU, nccl on CUDA. Only rank 0 writes files; every rank runs every collective.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from lmrefinery.models.layers import find_decoder_layers


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> DistEnv:
    """Read torchrun's environment; initialise the process group when there is more than one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # A rank may wait at a barrier while others finish uneven work (e.g. teacher shards after a resume).
        minutes = float(os.environ.get("LMREFINERY_DIST_TIMEOUT_MIN", "120"))
        timeout = timedelta(minutes=minutes)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart not in (None, "0"):
            # Workers restarted by torchrun (--max-restarts) meet in the store the dead workers used, whose keys
            # (the old ranks' addresses) are still there: the new group would try to connect to processes that no
            # longer exist. Each restart gets keys of its own.
            store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
            dist.init_process_group(backend, store=dist.PrefixStore(f"lmrefinery-restart-{restart}", store),
                                    rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return DistEnv(rank, world_size, local_rank, device)


def teardown_distributed(every_rank_finished: bool = False) -> None:
    """Leave the process group. After a run that every rank finished, meet once more first: a rank that closes its
    connections while a peer is still inside its last collective can make the peer's gloo threads abort at exit
    (seen as "terminate called without an active exception" after the outputs were written). After an error the
    other ranks may never arrive, so no barrier then."""
    if dist.is_initialized():
        if every_rank_finished:
            dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: its shard when FSDP2 made it a DTensor, else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, env: DistEnv):
    if not env.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_object(obj, env: DistEnv) -> list:
    """Every rank's `obj` (a small picklable value), on every rank."""
    if not env.distributed:
        return [obj]
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def progress_bar(env: DistEnv, total: int, desc: str, initial: int = 0):
    """A tqdm bar on rank 0. Written to a log file rather than a terminal, it updates at most every 30 s."""
    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=not env.is_main, dynamic_ncols=True,
                mininterval=0.1 if interactive else 30.0)


def shard_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """FSDP2: each decoder block is one shard unit (so LISA can freeze blocks), the rest goes with the root."""
    if not env.distributed:
        return model
    for block in find_decoder_layers(model):
        fully_shard(block)
    fully_shard(model)
    return model


def gradient_sum_factor(env: DistEnv) -> float:
    """FSDP averages gradients over ranks; losses are normalised by the global token count, so we want the sum."""
    return float(env.world_size)


def default_device() -> torch.device:
    """The device a single-process stage runs on: the first GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def single_process_progress(total: int, description: str):
    """A progress bar for work done outside a distributed run (one process, one bar)."""
    return progress_bar(DistEnv(), total, description)
