"""The current resident set size of this process — what the memory benchmarks sample around the work they measure
(peak RSS from getrusage cannot be reset between phases; sampling the current value can)."""

from __future__ import annotations

import os


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def status_kib() -> dict[str, int]:
    """This process's memory lines of /proc/self/status (Linux), in KiB: VmHWM is its own peak RSS (unlike getrusage's
    ru_maxrss, which a child starts from its parent's value), VmRSS the current one, RssAnon / RssFile its anonymous
    and file-backed parts. Empty where there is no /proc."""
    try:
        with open("/proc/self/status") as handle:
            lines = [line.split(":", 1) for line in handle if ":" in line]
    except OSError:
        return {}
    return {key: int(value.split()[0]) for key, value in lines if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}
