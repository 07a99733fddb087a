"""What a run ran on: package versions, CPU model and kernel capability, accelerator.

Two runs of one config and code can differ beyond their last digits when the machine differs (bf16 kernels pick
different instruction sets: docs/results.md, "Family set B, mixture, at the final code"), so a results file must say
which machine and libraries produced it before two of them are compared.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("lmrefinery", "torch", "transformers", "datasets", "scipy")


# The instruction sets that decide which bf16/fp32 kernels oneDNN and torch pick on x86 (torch's own capability
# string stops at AVX512 and does not say whether AMX or AVX512-BF16 is there).
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _read_cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text(errors="replace") if path.is_file() else ""


def _first_field(cpuinfo: str | None, name: str) -> str:
    """The value of the first non-empty `name : value` line (the first processor's), or "" where there is none."""
    for line in (_read_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name and value.strip():
            return value.strip()
    return ""


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's marketing name: the first `model name` line of /proc/cpuinfo on Linux, else `platform.processor()`."""
    return _first_field(cpuinfo, "model name") or platform.processor() or platform.machine()


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """Which of KERNEL_FLAGS the first processor of /proc/cpuinfo lists (empty where there is no such file)."""
    present = set(_first_field(cpuinfo, "flags").split())
    return [flag for flag in KERNEL_FLAGS if flag in present]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe() -> dict:
    """A JSON-ready record of this process's environment (imports torch; call it once per results file)."""
    import torch

    accelerators = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                    if torch.cuda.is_available() else [])
    cpuinfo = _read_cpuinfo()  # once, for both fields
    return {
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "platform": platform.platform(),
        "cpu": cpu_model(cpuinfo),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": cpu_flags(cpuinfo),
        "torch_threads": torch.get_num_threads(),
        "accelerators": accelerators,
    }


def summary_line(environment: dict) -> str:
    """One line for a report: the CPU and its kernel capability, the accelerators, and the library versions."""
    packages = environment["packages"]
    devices = ", ".join(environment["accelerators"]) or "no accelerator"
    versions = ", ".join(f"{name} {packages[name]}" for name in ("torch", "transformers") if packages.get(name))
    kernels = " ".join([environment["cpu_capability"]] + environment["cpu_flags"])
    return (f"{environment['cpu']} ({kernels}, {environment['torch_threads']} threads), "
            f"{devices}; {versions}; Python {environment['python']}")
