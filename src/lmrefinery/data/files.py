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


def _read_jsonl(path: Path) -> Iterator[Record | BadRecord]:
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                text = _utf8_line(raw, path, line_no)
                if not text.strip():
                    continue
                try:
                    fields = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise BadRecord(f"{path} line {line_no}", f"malformed JSON ({exc.msg} at column {exc.colno})")
                yield Record(f"{path} line {line_no}", fields)
            except BadRecord as bad:
                yield bad


def _read_json(path: Path) -> Iterator[Record]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path} line {line_no}: not valid UTF-8 (byte {raw[exc.start]:#04x})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} line {exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
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


def read_records(path: str | Path) -> Iterator[Record | BadRecord]:
    """Yield every record of a data file, or a BadRecord where a single record cannot be read at all."""
    path = Path(path)
    if not path.exists():
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
