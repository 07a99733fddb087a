"""YAML file + dotted `key=value` overrides → a validated, typed config.

Unknown keys and bad values are user errors (exit 2) that name the key path and what was expected, e.g.
`train.lr: expected a number, got 'fast'`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from lmrefinery.errors import UserError


class StrictModel(BaseModel):
    """Every config section: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


ConfigT = TypeVar("ConfigT")


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override '{text}': expected key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{text}': expected a dotted key such as train.lr")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    node: Any = tree
    for depth, part in enumerate(path[:-1]):
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise UserError(f"override {'.'.join(path)}: '{where}' is a value, not a section")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(path))] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(f"override {where}: expected a list index below {len(node)}")
    return int(part)


def _describe_error(error: dict) -> str:
    path = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key"
    if kind == "missing":
        return f"{path}: required key is missing"
    got = error.get("input")
    got_text = "" if isinstance(got, dict) else f", got {got!r}"
    return f"{path}: {error['msg'][0].lower()}{error['msg'][1:]}{got_text}"


def validate_config(cls: type[ConfigT], tree: dict, origin: str = "config") -> ConfigT:
    """`cls` is a config class or a tagged union of them (evaluate's per-task configs)."""
    try:
        return TypeAdapter(cls).validate_python(tree)
    except ValidationError as exc:
        lines = [_describe_error(e) for e in exc.errors()]
        raise UserError(f"{origin}: " + "; ".join(lines)) from None


def load_config(cls: type[ConfigT], path: str | os.PathLike | None, overrides: list[str] = ()) -> ConfigT:
    tree: dict = {}
    origin = "command line"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read config file ({exc.__class__.__name__}: {exc})") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(tree, dict):
            raise UserError(f"{path}: expected a mapping of config keys at the top level")
    for text in overrides:
        apply_override(tree, *_parse_override(text))
    return validate_config(cls, tree, origin)


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
