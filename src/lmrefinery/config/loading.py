"""YAML file + dotted `key=value` overrides → a validated, typed config.

Unknown keys and bad values are user errors (exit 2) that name where the key came from (the file or the command
line), the key path and what was expected, e.g. `command line: train.lrr: unknown key (did you mean train.lr?)`.

Relative paths written in a config file are relative to that file's directory, so a config works from any working
directory; paths given on the command line are relative to the working directory (as a shell user expects). A field
is a path when its schema says so (`path_field`): `always` (output directories, data files) or `if_exists` (a model
location, which may also be a hub id or a built-in alias: resolved when it exists beside the config file or is
written as an explicit relative path, `./…` or `../…`).
"""

from __future__ import annotations

import difflib
import logging
import os
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from lmrefinery.errors import UserError

log = logging.getLogger(__name__)


class StrictModel(BaseModel):
    """Every config section: unknown keys are errors (a typo must not be silently ignored).

    `renamed_keys` maps a key's old name to its new one: a config file or override that still uses the old name is
    read under the new one, with a one-line notice, for one release."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    renamed_keys: ClassVar[dict[str, str]] = {}


ConfigT = TypeVar("ConfigT")


def path_field(default: Any = ..., *, description: str, resolve: str = "always", **options) -> Any:
    """A config field holding a path (see the module docstring for `resolve`)."""
    return Field(default, description=description, json_schema_extra={"path": resolve}, **options)


def model_classes(annotation) -> list[type[BaseModel]]:
    """The config classes an annotation can hold (through Optional, list, Annotated and unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for argument in typing.get_args(annotation):
        found += model_classes(argument)
    return found


def config_class_for(cls, tree: Any) -> type[BaseModel]:
    """The concrete config class of `tree` (a tagged union — evaluate's — picks its member by the tag)."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return cls
    union, *metadata = typing.get_args(cls)
    discriminator = next(m.discriminator for m in metadata if hasattr(m, "discriminator"))
    tag = discriminator(tree if isinstance(tree, dict) else {})
    for member in typing.get_args(union):
        model, *tags = typing.get_args(member)
        if any(getattr(t, "tag", None) == tag for t in tags):
            return model
    raise ValueError(f"no member of {cls} for tag {tag!r}")


def _class_or_none(cls, tree: Any) -> type[BaseModel] | None:
    try:
        return config_class_for(cls, tree)
    except ValueError:  # a union tag no member has: validation will say so
        return None


def _field_class(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    if model is None or key not in model.model_fields:
        return None
    classes = model_classes(model.model_fields[key].annotation)
    return classes[0] if len(classes) == 1 else None


def model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The config class of the section at `loc` (list indices skipped), or None where it is not a section."""
    for part in loc:
        if isinstance(part, int):
            continue
        model = _field_class(model, str(part))
        if model is None:
            return None
    return model


def resolve_relative_paths(tree: Any, model: type[BaseModel] | None, base: Path) -> Any:
    """Rewrite the relative paths of a config file's tree against the file's directory `base`."""
    if isinstance(tree, list):
        return [resolve_relative_paths(item, model, base) for item in tree]
    if not isinstance(tree, dict) or model is None:
        return tree
    resolved = {}
    for key, value in tree.items():
        field = model.model_fields.get(key)
        mode = ((field.json_schema_extra or {}).get("path") if field is not None
                and isinstance(field.json_schema_extra, dict) else None)
        if mode and isinstance(value, (str, list)):
            value = ([_resolve_path(v, mode, base) for v in value] if isinstance(value, list)
                     else _resolve_path(value, mode, base))
        elif field is not None:
            value = resolve_relative_paths(value, _field_class(model, key), base)
        resolved[key] = value
    return resolved


def apply_renamed_keys(tree: Any, model: type[BaseModel] | None, prefix: str = "") -> Any:
    """Old key names → new ones throughout `tree` (see StrictModel.renamed_keys), each with a one-line notice."""
    if isinstance(tree, list):
        return [apply_renamed_keys(item, model, prefix) for item in tree]
    if not isinstance(tree, dict) or model is None:
        return tree
    renamed = {}
    for key, value in tree.items():
        new = getattr(model, "renamed_keys", {}).get(key)
        if new is not None:
            if new in tree:
                raise UserError(f"{prefix}{key} and {prefix}{new}: {key} is the old name of {new}; give only {new}")
            log.warning("config key %s%s is now %s%s; the old name will be removed in the next release",
                        prefix, key, prefix, new)
            key = new
        renamed[key] = apply_renamed_keys(value, _field_class(model, key), f"{prefix}{key}.")
    return renamed


def _resolve_path(value: Any, mode: str, base: Path) -> Any:
    if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
        return value
    candidate = base / Path(value).expanduser()
    if mode == "always" or candidate.exists() or value.startswith(("./", "../")):
        return str(candidate.resolve())
    return value


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


def _suggestion(model: type[BaseModel] | None, loc: tuple) -> str:
    parent = model_at(model, loc[:-1]) if model is not None else None
    if parent is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(parent.model_fields), n=1, cutoff=0.6)
    prefix = ".".join(str(p) for p in loc[:-1])
    return f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""


def _describe_error(error: dict, model: type[BaseModel] | None) -> str:
    path = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key{_suggestion(model, error['loc'])}"
    if kind == "missing":
        return f"{path}: required key is missing"
    got = error.get("input")
    got_text = "" if isinstance(got, dict) else f", got {got!r}"
    return f"{path}: {error['msg'][0].lower()}{error['msg'][1:]}{got_text}"


def _strip_union_tag(cls, tree, loc: tuple) -> tuple:
    """A tagged union reports its member's errors under the tag (`mcq.data...`): the user wrote `data...`."""
    if isinstance(cls, type) or not loc:
        return loc
    return loc[1:] if isinstance(loc[0], str) and loc[0] not in (tree if isinstance(tree, dict) else {}) else loc


def validate_config(cls: type[ConfigT], tree: dict, origin: str = "config",
                    override_keys: list[str] = ()) -> ConfigT:
    """`cls` is a config class or a tagged union of them (evaluate's per-task configs). Errors name their origin:
    `origin` (the file), or the command line for the keys in `override_keys`."""
    try:
        return TypeAdapter(cls).validate_python(tree)
    except ValidationError as exc:
        model = _class_or_none(cls, tree)
        messages: dict[str, list[str]] = {}
        for error in exc.errors():
            error = dict(error, loc=_strip_union_tag(cls, tree, error["loc"]))
            dotted = ".".join(str(p) for p in error["loc"])
            from_command_line = any(dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + ".")
                                    for key in override_keys)
            messages.setdefault("command line" if from_command_line else origin, []).append(
                _describe_error(error, model))
        raise UserError("; ".join(f"{where}: " + "; ".join(lines) for where, lines in messages.items())) from None


def _yaml_error(path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    return f"{path}{where}: not valid YAML ({problem})"


def load_config(cls: type[ConfigT], path: str | os.PathLike | None, overrides: list[str] = ()) -> ConfigT:
    tree: dict = {}
    origin = "command line"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read config file ({exc.__class__.__name__}: {exc})") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise UserError(_yaml_error(path, exc)) from None
        if not isinstance(tree, dict):
            raise UserError(f"{path}: expected a mapping of config keys at the top level")
        tree = apply_renamed_keys(tree, _class_or_none(cls, tree))
        tree = resolve_relative_paths(tree, _class_or_none(cls, tree), Path(path).resolve().parent)
    keys = []
    for text in overrides:
        key, value = _parse_override(text)
        key = _renamed_path(_class_or_none(cls, tree), key)
        apply_override(tree, key, value)
        keys.append(".".join(key))
    return validate_config(cls, tree, origin, keys)


def _renamed_path(model: type[BaseModel] | None, path: list[str]) -> list[str]:
    """An override's key with old names replaced by new ones (see StrictModel.renamed_keys), with the notice."""
    renamed = []
    for part in path:
        new = getattr(model, "renamed_keys", {}).get(part) if model is not None else None
        if new is not None:
            log.warning("config key %s is now %s; the old name will be removed in the next release",
                        ".".join(renamed + [part]), ".".join(renamed + [new]))
            part = new
        renamed.append(part)
        if not part.isdigit():
            model = _field_class(model, part)
    return renamed


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
