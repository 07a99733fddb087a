"""Logging set-up shared by the CLI and by processes the CLI spawns (compare's per-method processes)."""

from __future__ import annotations

import logging
import os


def configure_logging() -> None:
    """INFO on rank 0, warnings only on the other ranks (one readable log under torchrun)."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
