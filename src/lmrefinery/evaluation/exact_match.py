"""Exact-match accuracy of generated answers: greedy decoding after each conversation's prompt, scored against the
reference reply — by reasoning-gym's own scorer when the record carries reasoning-gym metadata (task, seed, count,
index, as written by `lmrefinery.data.builders`), else by exact string match after stripping whitespace."""

from __future__ import annotations

from functools import lru_cache

import torch

from lmrefinery.data.files import BadRecord, read_records
from lmrefinery.data.formats import Conversation, detect_format, parse_record
from lmrefinery.errors import UserError


def load_prompts(path: str) -> list[dict]:
    """Records whose last turn is the assistant's reply: {messages before it, reference, metadata}."""
    items, fmt = [], None
    for record in read_records(path):
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


@lru_cache(maxsize=32)
def _reasoning_gym_dataset(task: str, seed: int, count: int, config_json: str):
    import json

    import reasoning_gym

    return reasoning_gym.create_dataset(task, size=count, seed=seed, **json.loads(config_json))


def score(item: dict, answer: str) -> float:
    import json

    meta = item["metadata"]
    if all(meta.get(k) is not None for k in ("task", "seed", "count", "index")):
        dataset = _reasoning_gym_dataset(meta["task"], int(meta["seed"]), int(meta["count"]),
                                         json.dumps(meta.get("config") or {}, sort_keys=True))
        return float(dataset.score_answer(answer, dataset[int(meta["index"])]))
    return float(answer.strip() == item["reference"].strip())


@torch.no_grad()
def generate_answers(model, tokenizer, items: list[dict], batch_size: int, max_new_tokens: int, device) -> list[str]:
    model.eval()
    answers = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last real token of every row
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start: start + batch_size]
            if getattr(tokenizer, "chat_template", None):
                prompts = [tokenizer.apply_chat_template(i["messages"], tokenize=False, add_generation_prompt=True)
                           for i in chunk]
                encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            else:
                prompts = ["".join(f"### User:\n{m['content']}\n\n" for m in i["messages"]) + "### Assistant:\n"
                           for i in chunk]
                encoded = tokenizer(prompts, return_tensors="pt", padding=True)
            encoded = {k: v.to(device) for k, v in encoded.items()}
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for row in output[:, encoded["input_ids"].shape[1]:]:
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = padding_side
    return answers
