"""Atomic file output (a reader, or a crash, never sees a half-written file or directory) and file digests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from lmrefinery.errors import UserError


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (checkpoint and teacher-cache files run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _temp_sibling(path: Path, is_dir: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    if is_dir:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = _temp_sibling(path, is_dir=False)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block finishes without error."""
    path = Path(path)
    tmp = _temp_sibling(path, is_dir=True)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def output_directory(path: str | os.PathLike) -> Path:
    """`path` as a directory to write into: refused (exit 2) when a file is in the way."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: output_dir exists and is a file, not a directory")
    return path


def remove_temporaries(directory: str | os.PathLike) -> None:
    """Delete leftovers of atomic writes interrupted by a kill (names start with '.' and contain '.tmp-')."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        if child.name.startswith(".") and ".tmp-" in child.name:
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def cache_root() -> Path:
    """Where lmrefinery keeps what it can rebuild (the embedded model, tokenised pools): $LMREFINERY_CACHE, else
    $XDG_CACHE_HOME/lmrefinery, else ~/.cache/lmrefinery."""
    if os.environ.get("LMREFINERY_CACHE"):
        return Path(os.environ["LMREFINERY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmrefinery"
