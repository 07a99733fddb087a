"""Reading records from .json, .jsonl, .parquet files and datasets `save_to_disk` directories.

Each record comes with a location string ("train.jsonl line 12", "data.json record 3") so that any later complaint
about it can name the file and the record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import datasets
import pyarrow.parquet as pq

from lmrefinery.errors import UserError


class BadRecord(Exception):
    """One record cannot be used; `skip` mode counts it, `error` mode turns it into a UserError."""

    def __init__(self, location: str, problem: str):
        super().__init__(f"{location}: {problem}")
        self.location = location
        self.problem = problem


@dataclass(frozen=True)
class Record:
    location: str
    fields: object  # normally a dict; anything else is reported by the format parser


def _utf8_line(raw: bytes, path: Path, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord(f"{path} line {line_no}", f"not valid UTF-8 (byte {raw[exc.start]:#04x} at column "
                                                  f"{exc.start + 1})") from None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's object hook: a key written twice would otherwise keep its last value silently."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def parse_json(text: str):
    return json.loads(text, object_pairs_hook=_unique_keys)


BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, as some editors write at the start of a file


def _read_jsonl(path: Path) -> Iterator[Record | BadRecord]:
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                text = _utf8_line(raw.removeprefix(BOM) if line_no == 1 else raw, path, line_no)
                if not text.strip():
                    continue
                try:
                    fields = parse_json(text)
                except json.JSONDecodeError as exc:
                    raise BadRecord(f"{path} line {line_no}", f"malformed JSON ({exc.msg} at column {exc.colno})")
                except _DuplicateKey as exc:
                    raise BadRecord(f"{path} line {line_no}", f"key '{exc}' appears twice in one object")
                yield Record(f"{path} line {line_no}", fields)
            except BadRecord as bad:
                yield bad


def _read_json(path: Path) -> Iterator[Record]:
    raw = path.read_bytes().removeprefix(BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path} line {line_no}: not valid UTF-8 (byte {raw[exc.start]:#04x})") from None
    try:
        document = parse_json(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} line {exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    except _DuplicateKey as exc:
        raise UserError(f"{path}: key '{exc}' appears twice in one object") from None
    if isinstance(document, dict) and isinstance(document.get("instances"), list):
        document = document["instances"]
    if not isinstance(document, list):
        raise UserError(f"{path}: expected a JSON list of records or an object with an 'instances' list")
    for index, fields in enumerate(document):
        yield Record(f"{path} record {index}", fields)


def _read_parquet(path: Path) -> Iterator[Record]:
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for unreadable files
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    for index, fields in enumerate(table.to_pylist()):
        yield Record(f"{path} row {index}", fields)


def _read_saved_dataset(path: Path) -> Iterator[Record]:
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError or its own errors for foreign directories
        raise UserError(f"{path}: not a datasets save_to_disk directory ({exc})") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise UserError(f"{path}: holds a DatasetDict with splits {list(dataset)}; point at one split's directory")
    for index, fields in enumerate(dataset):
        yield Record(f"{path} row {index}", fields)


def _read_with_datasets(location: str, split: str | None, subset: str | None) -> Iterator[Record]:
    """A dataset `datasets.load_dataset` understands — a hub id, or a local directory of data files — streamed record
    by record (nothing is materialised), each named "<location> split <split> record <index>"."""
    split = split or "train"
    try:
        dataset = datasets.load_dataset(location, subset, split=split, streaming=True)
        rows = iter(dataset)
        first = next(rows, None)
    except Exception as exc:  # datasets raises many types for a wrong id, split, subset or an offline miss
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        where = f"{location}" + (f" subset {subset}" if subset else "") + f" split {split}"
        raise UserError(f"{where}: cannot load with datasets.load_dataset ({message[:200]})") from None
    if first is None:
        return
    yield Record(f"{location} split {split} record 0", first)
    for index, fields in enumerate(rows, start=1):
        yield Record(f"{location} split {split} record {index}", fields)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "state.json").exists()


def read_records(path: str | Path, split: str | None = None, subset: str | None = None) -> Iterator[Record | BadRecord]:
    """Yield every record of a data source, or a BadRecord where a single record cannot be read at all. A source is
    a .json / .jsonl / .parquet file, a `save_to_disk` directory, or — with `split`/`subset`, or a directory of data
    files, or a hub id — whatever `datasets.load_dataset` reads."""
    location = str(path)
    path = Path(path)
    if split is not None or subset is not None or (path.is_dir() and not _is_saved_dataset(path)):
        yield from _read_with_datasets(location, split, subset)
        return
    if not path.exists():
        if "/" in location and not path.suffix and not location.startswith((".", "/")):  # looks like org/name
            yield from _read_with_datasets(location, split, subset)
            return
        raise UserError(f"{path}: file not found")
    if path.is_dir():
        yield from _read_saved_dataset(path)
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise UserError(f"{path}: unsupported file type '{suffix}'; expected .json, .jsonl, .parquet or a "
                        f"save_to_disk directory")
