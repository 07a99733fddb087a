"""Record formats → one conversation type.

    alpaca     {"instruction", "input"?, "output", "system"?}
    sharegpt   {"conversations": [{"from": "human"|"gpt"|"system", "value"}]}
    messages   {"messages": [{"role": "system"|"user"|"assistant", "content"}]}
    text2text  {"input", "output"}
    text       {"text"}  (plain language modelling: every token supervised)

`auto` picks the format from the first record of a file; every record of that file is then parsed in that format.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmrefinery.data.files import BadRecord

ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
}


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class PlainText:
    text: str


Example = Conversation | PlainText


def detect_format(fields: object, location: str) -> str:
    if isinstance(fields, dict):
        if "messages" in fields:
            return "messages"
        if "conversations" in fields:
            return "sharegpt"
        if "instruction" in fields and "output" in fields:
            return "alpaca"
        if "input" in fields and "output" in fields:
            return "text2text"
        if "text" in fields:
            return "text"
        keys = ", ".join(sorted(map(str, fields))) or "none"
    else:
        keys = f"a {type(fields).__name__}, not an object"
    raise BadRecord(location, f"cannot detect the format (keys: {keys}); expected 'messages', 'conversations', "
                              f"'instruction'+'output', 'input'+'output' or 'text'")


def _string(fields: dict, key: str, location: str, *, optional: bool = False) -> str:
    if key not in fields or fields[key] is None:
        if optional:
            return ""
        raise BadRecord(location, f"missing field '{key}'")
    value = fields[key]
    if not isinstance(value, str):
        raise BadRecord(location, f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _turn_list(fields: dict, key: str, role_key: str, text_key: str, location: str) -> tuple[Message, ...]:
    turns = fields.get(key)
    if not isinstance(turns, list):
        raise BadRecord(location, f"field '{key}' must be a list of turns"
                        if key in fields else f"missing field '{key}'")
    messages = []
    for index, turn in enumerate(turns):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise BadRecord(location, f"{where} must be an object with '{role_key}' and '{text_key}'")
        role = turn.get(role_key)
        if role not in ROLE_ALIASES:
            raise BadRecord(location, f"{where}.{role_key} must be one of {sorted(ROLE_ALIASES)}, got {role!r}")
        messages.append(Message(ROLE_ALIASES[role], _string(turn, text_key, f"{location} {where}")))
    return tuple(messages)


def _check_roles(messages: tuple[Message, ...], location: str) -> Conversation:
    if not messages:
        raise BadRecord(location, "conversation has no turns")
    empty = [index for index, m in enumerate(messages) if m.role == "assistant" and not m.content.strip()]
    if empty:
        raise BadRecord(location, f"assistant turn {empty[0]} is empty: there is nothing to learn in it but the "
                                  f"end-of-turn token")
    if any(m.role == "system" for m in messages[1:]):
        raise BadRecord(location, "a system turn is only allowed first")
    if not any(m.role == "assistant" for m in messages):
        raise BadRecord(location, "conversation has no assistant turn to learn from")
    return Conversation(messages)


def parse_record(fields: object, fmt: str, location: str) -> Example:
    if not isinstance(fields, dict):
        raise BadRecord(location, f"expected a JSON object, got {type(fields).__name__}")
    if fmt == "text":
        return PlainText(_string(fields, "text", location))
    if fmt == "messages":
        return _check_roles(_turn_list(fields, "messages", "role", "content", location), location)
    if fmt == "sharegpt":
        return _check_roles(_turn_list(fields, "conversations", "from", "value", location), location)
    if fmt == "alpaca":
        instruction = _string(fields, "instruction", location)
        extra_input = _string(fields, "input", location, optional=True)
        prompt = f"{instruction}\n\n{extra_input}" if extra_input else instruction
        system = _string(fields, "system", location, optional=True)
        turns = ((Message("system", system),) if system else ()) + (
            Message("user", prompt), Message("assistant", _string(fields, "output", location)))
        return _check_roles(turns, location)
    if fmt == "text2text":
        return _check_roles((Message("user", _string(fields, "input", location)),
                             Message("assistant", _string(fields, "output", location))), location)
    raise ValueError(f"unknown format {fmt!r}")
