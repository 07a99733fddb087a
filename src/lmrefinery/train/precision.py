"""Compute precision: bf16 autocast with fp32 master weights, on CPU or CUDA — and `auto`, which picks bf16 where the
hardware runs it fast.

`auto` resolves to bf16 on a CUDA device that supports it and on a CPU whose instruction set has native bf16
arithmetic (AVX512_BF16 or AMX on x86: on a 2-core AVX512_BF16 machine a SmolLM2-135M training step ran 2.5× faster
than in fp32); elsewhere (older CPUs, where emulated bf16 is slower than fp32) it resolves to fp32. The environment
variable LMREFINERY_AUTO_PRECISION=fp32|bf16 fixes what `auto` means (the test suite pins it to fp32 so that its
tolerances hold on any machine).
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
from pathlib import Path

import torch

FAST_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap reliable probe, so stay with fp32
        return False
    return any(flag in flags.split() for flag in FAST_CPU_BF16_FLAGS)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'fp32' or 'bf16' for a configured precision ('auto', 'fp32' or 'bf16') on `device`."""
    if precision != "auto":
        return precision
    forced = os.environ.get("LMREFINERY_AUTO_PRECISION")
    if forced in ("fp32", "bf16"):
        return forced
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and _cpu_has_fast_bf16() else "fp32"


def autocast(precision: str, device: torch.device | str):
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
