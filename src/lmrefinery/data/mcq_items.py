"""Multiple-choice items: the two record formats, parsed into the prompt every command shows the model.

    {"question": "...", "options": ["...", "..."] | {"A": "...", "B": "..."}, "answer": "B" | 1}
    {"prompt": "... (already lists the options) ...", "answer": "B", "letters": ["A", "B", "C", "D"]}

The prompt (question, lettered options, instruction) is the user turn; `mcq_conversation` adds the gold letter as the
assistant turn, so a model fine-tuned on those conversations is scored (evaluation/mcq.py) on exactly its prompt.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from lmrefinery.data.files import BadRecord, read_records
from lmrefinery.errors import UserError

INSTRUCTION = "Answer with the letter of the correct option only."


@dataclass
class MCQItem:
    location: str
    prompt: str
    letters: list[str]
    gold: int  # index into letters


def _answer_index(value, letters: list[str], location: str) -> int:
    if isinstance(value, bool):
        raise BadRecord(location, f"'answer' must be a letter or an index, got {value!r}")
    if isinstance(value, int):
        if not 0 <= value < len(letters):
            raise BadRecord(location, f"'answer' index {value} is outside the {len(letters)} options")
        return value
    if isinstance(value, str) and value.strip().upper() in letters:
        return letters.index(value.strip().upper())
    raise BadRecord(location, f"'answer' must be one of {letters} or an index, got {value!r}")


def _check_letters(letters: list[str], location: str) -> list[str]:
    if len(letters) < 2:
        raise BadRecord(location, f"a multiple-choice item needs at least 2 options, got {len(letters)}")
    repeated = sorted({letter for letter in letters if letters.count(letter) > 1})
    if repeated:
        raise BadRecord(location, f"option letters must be distinct (ignoring case); repeated: {repeated}")
    return letters


def parse_item(fields: object, location: str) -> MCQItem:
    if not isinstance(fields, dict) or "answer" not in fields:
        raise BadRecord(location, "expected an object with 'answer' and either 'question'+'options' or 'prompt'")
    if "prompt" in fields:
        letters = _check_letters([str(x).upper() for x in fields.get("letters", list("ABCD"))], location)
        if not isinstance(fields["prompt"], str):
            raise BadRecord(location, "'prompt' must be a string")
        return MCQItem(location, fields["prompt"], letters, _answer_index(fields["answer"], letters, location))
    options = fields.get("options")
    if isinstance(options, dict):
        letters, texts = [str(k).upper() for k in options], [str(v) for v in options.values()]
    elif isinstance(options, list) and options:
        letters, texts = list(string.ascii_uppercase[: len(options)]), [str(o) for o in options]
    else:
        raise BadRecord(location, "'options' must be a non-empty list or a {letter: text} object")
    _check_letters(letters, location)
    if not isinstance(fields.get("question"), str):
        raise BadRecord(location, "missing string field 'question'")
    listing = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, texts))
    prompt = f"{fields['question']}\n\n{listing}\n\n{INSTRUCTION}"
    return MCQItem(location, prompt, letters, _answer_index(fields["answer"], letters, location))


def load_items(path: str, on_bad_record: str = "error", split: str | None = None,
               subset: str | None = None) -> list[MCQItem]:
    items = []
    for record in read_records(path, split, subset):
        try:
            if isinstance(record, BadRecord):
                raise record
            items.append(parse_item(record.fields, record.location))
        except BadRecord as bad:
            if on_bad_record == "error":
                raise UserError(f"{bad.location}: {bad.problem}") from None
    if not items:
        raise UserError(f"{path}: no multiple-choice items")
    return items


def mcq_conversation(item: dict | MCQItem, location: str = "item") -> dict:
    """An item as a training conversation: its prompt as the user turn, the gold letter as the reply."""
    parsed = item if isinstance(item, MCQItem) else parse_item(item, location)
    return {"messages": [{"role": "user", "content": parsed.prompt},
                         {"role": "assistant", "content": parsed.letters[parsed.gold]}]}
