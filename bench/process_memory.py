"""The current resident set size of this process — what the memory benchmarks sample around the work they measure
(peak RSS from getrusage cannot be reset between phases; sampling the current value can)."""

from __future__ import annotations

import os


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
