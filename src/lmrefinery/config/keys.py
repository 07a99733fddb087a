"""Every key of a config class, with its type, default and one-line meaning — what `lmrefinery <cmd> --help` lists,
generated from the classes themselves so that it cannot drift from what the command accepts."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass

from pydantic import BaseModel

from lmrefinery.config.loading import model_classes


@dataclass(frozen=True)
class ConfigKey:
    key: str           # dotted, list items as `[]`: data.sources[].path
    type: str
    default: str       # "required" when there is none
    description: str


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "|".join(repr(value) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        parts = [_type_name(a) for a in typing.get_args(annotation)]
        return " or ".join("null" if p == "NoneType" else p for p in parts)
    if origin in (list, tuple, dict):
        inner = ", ".join(_type_name(a) for a in typing.get_args(annotation) if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(field) -> str:
    """What --help prints as a key's default: its value, including one a factory makes (e.g. an empty list)."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return "section defaults" if isinstance(value, BaseModel) else repr(value)


def config_keys(model: type[BaseModel], prefix: str = "") -> list[ConfigKey]:
    """Leaf keys first-level-first: a section's keys follow the section's own line."""
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        classes = model_classes(field.annotation)
        is_list = typing.get_origin(field.annotation) is list or any(
            typing.get_origin(a) is list for a in typing.get_args(field.annotation))
        default = _default_text(field)
        description = (field.description or "").strip()
        if len(classes) == 1:
            keys.append(ConfigKey(key, "list of sections" if is_list else "section", default, description))
            keys += config_keys(classes[0], f"{key}[]." if is_list else f"{key}.")
        else:
            keys.append(ConfigKey(key, _type_name(field.annotation), default, description))
    return keys
