"""Exact-match accuracy of generated answers: greedy decoding after each conversation's prompt, scored against the
reference reply — by reasoning-gym's own scorer when the record carries reasoning-gym metadata (task, seed, count,
index, as written by `lmrefinery.data.builders`), else by exact string match after stripping whitespace."""

from __future__ import annotations

import torch

from lmrefinery.data.builders import score_answer
from lmrefinery.data.files import BadRecord, read_records
from lmrefinery.data.formats import Conversation, detect_format, parse_record
from lmrefinery.data.tokenize import ChatEncoder
from lmrefinery.errors import UserError


def load_prompts(path: str, split: str | None = None, subset: str | None = None) -> list[dict]:
    """Records whose last turn is the assistant's reply: {messages before it, reference, metadata}."""
    items, fmt = [], None
    for record in read_records(path, split, subset):
        if isinstance(record, BadRecord):
            raise UserError(f"{record.location}: {record.problem}")
        try:
            fmt = fmt or detect_format(record.fields, record.location)
            example = parse_record(record.fields, fmt, record.location)
        except BadRecord as bad:
            raise UserError(f"{bad.location}: {bad.problem}") from None
        if not isinstance(example, Conversation) or example.messages[-1].role != "assistant":
            raise UserError(f"{record.location}: exact match needs a conversation ending with the assistant's reply")
        items.append({"location": record.location,
                      "messages": [{"role": m.role, "content": m.content} for m in example.messages[:-1]],
                      "reference": example.messages[-1].content,
                      "metadata": {k: record.fields.get(k) for k in ("task", "seed", "count", "index", "config")}})
    if not items:
        raise UserError(f"{path}: no records")
    return items


def score(item: dict, answer: str) -> float:
    meta = item["metadata"]
    if all(meta.get(k) is not None for k in ("task", "seed", "count", "index")):
        return score_answer(meta["task"], int(meta["seed"]), int(meta["count"]), int(meta["index"]), answer,
                            meta.get("config"))
    return float(answer.strip() == item["reference"].strip())


@torch.no_grad()
def generate_answers(model, encoder: ChatEncoder, items: list[dict], batch_size: int, max_new_tokens: int,
                     device) -> list[str]:
    """Greedy replies to each item's prompt — built by `encoder.prompt_ids`, the prefix training conditions on —
    in left-padded batches (generation continues from every row's last real token)."""
    model.eval()
    tokenizer = encoder.tokenizer
    answers = []
    for start in range(0, len(items), batch_size):
        prompts = [encoder.prompt_ids(item["messages"]) for item in items[start: start + batch_size]]
        length = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), length), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):
            input_ids[row, length - len(ids):] = torch.tensor(ids)
            attention[row, length - len(ids):] = 1
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for row in output[:, length:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers
