"""Multiple-choice QA scored at the answer position (spec/first.md §7), with calibration.

Item formats (JSON list or JSONL, one item per record):
    {"question": "...", "options": ["...", "..."] | {"A": "...", "B": "..."}, "answer": "B" | 1}
    {"prompt": "... (already lists the options) ...", "answer": "B", "letters": ["A", "B", "C", "D"]}
The prompt goes through the chat template (with the generation prompt). The prediction is the top-1 next token over
the full vocabulary; it is correct iff it is a token of the gold letter ("A" and " A" both count). Confidence is that
token's full-vocabulary probability (the paper's definition); the option-restricted view sums each letter's variant
probabilities and renormalises over the options.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

import torch

from lmrefinery.data.files import BadRecord, read_records
from lmrefinery.errors import UserError
from lmrefinery.train.precision import autocast

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


def parse_item(fields: object, location: str) -> MCQItem:
    if not isinstance(fields, dict) or "answer" not in fields:
        raise BadRecord(location, "expected an object with 'answer' and either 'question'+'options' or 'prompt'")
    if "prompt" in fields:
        letters = [str(x).upper() for x in fields.get("letters", list("ABCD"))]
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
    if not isinstance(fields.get("question"), str):
        raise BadRecord(location, "missing string field 'question'")
    listing = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, texts))
    prompt = f"{fields['question']}\n\n{listing}\n\n{INSTRUCTION}"
    return MCQItem(location, prompt, letters, _answer_index(fields["answer"], letters, location))


def load_items(path: str, on_bad_record: str = "error") -> list[MCQItem]:
    items = []
    for record in read_records(path):
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


def letter_token_ids(tokenizer, letters: list[str]) -> list[list[int]]:
    """For each letter, every single-token spelling of it the tokenizer has ("A", " A")."""
    variants = []
    for letter in letters:
        ids = set()
        for text in (letter, f" {letter}"):
            encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1:
                ids.add(encoded[0])
        if not ids:
            raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no single token for option letter {letter!r}")
        variants.append(sorted(ids))
    return variants


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=False))
    return tokenizer(f"### User:\n{prompt}\n\n### Assistant:\n", add_special_tokens=True)["input_ids"]


@torch.no_grad()
def answer_logits(model, tokenizer, items: list[MCQItem], batch_size: int, precision: str, device):
    """Yield (item indices, fp32 next-token logits at the answer position) one batch at a time."""
    model.eval()
    encoded = [prompt_ids(tokenizer, item.prompt) for item in items]
    for start in range(0, len(items), batch_size):
        chunk = list(range(start, min(start + batch_size, len(items))))
        length = max(len(encoded[i]) for i in chunk)
        input_ids = torch.full((len(chunk), length), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, i in enumerate(chunk):
            input_ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            attention[row, : len(encoded[i])] = 1
        with autocast(precision, device):
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
        last = torch.tensor([len(encoded[i]) - 1 for i in chunk], device=device)
        yield chunk, logits[torch.arange(len(chunk), device=device), last].float().cpu()


def option_variants(tokenizer, items: list[MCQItem]) -> list[list[list[int]]]:
    """Per item: the token ids that spell each option letter (see `letter_token_ids`)."""
    variants_of = {letters: letter_token_ids(tokenizer, list(letters)) for letters in {tuple(i.letters) for i in items}}
    return [variants_of[tuple(item.letters)] for item in items]


def score_items(model, tokenizer, items: list[MCQItem], batch_size: int, precision: str, device,
                temperature: float = 1.0) -> list[dict]:
    """Per item: prediction, correctness and confidence in the full-vocabulary and option-restricted views.
    `temperature` divides the logits before the softmax (post-hoc temperature scaling)."""
    results = []
    variants_by_item = option_variants(tokenizer, items)
    for chunk, logits in answer_logits(model, tokenizer, items, batch_size, precision, device):
        probabilities = torch.softmax(logits / temperature, dim=-1)
        for row, i in enumerate(chunk):
            item = items[i]
            variants = variants_by_item[i]
            p = probabilities[row]
            top = int(p.argmax())
            predicted_letter = next((k for k, ids in enumerate(variants) if top in ids), None)
            masses = torch.tensor([float(p[ids].sum()) for ids in variants])
            restricted = masses / masses.sum().clamp(min=1e-30)
            option_prediction = int(restricted.argmax())
            results.append({
                "location": item.location, "gold": item.letters[item.gold],
                "predicted_token": tokenizer.decode([top]),
                "predicted": item.letters[predicted_letter] if predicted_letter is not None else None,
                "correct": predicted_letter == item.gold, "confidence": float(p[top]),
                "gold_probability": float(masses[item.gold]), "option_masses": masses.tolist(),
                "option_probabilities": restricted.tolist(), "option_predicted": item.letters[option_prediction],
                "option_correct": option_prediction == item.gold, "option_confidence": float(restricted.max()),
                "gold_index": item.gold})
    return results


def fit_temperature(logits: torch.Tensor, gold_token_ids: list[list[int]], low: float = 0.05,
                    high: float = 20.0, points: int = 200) -> float:
    """Post-hoc temperature scaling: the T minimising the mean NLL of the gold answer, −log Σ_{v ∈ gold} softmax(z/T)_v.

    A log-spaced grid, then a golden-section search between the best grid point's neighbours: the NLL is smooth in
    log T, and a grid first avoids trusting it to be unimodal over four decades.
    """
    logits = logits.double()

    def nll(temperature: float) -> float:
        log_probs = torch.log_softmax(logits / temperature, dim=-1)
        return -float(torch.stack([torch.logsumexp(log_probs[row, ids], dim=0)
                                   for row, ids in enumerate(gold_token_ids)]).mean())

    grid = torch.logspace(math.log10(low), math.log10(high), points, dtype=torch.float64).tolist()
    values = [nll(t) for t in grid]
    best = min(range(points), key=values.__getitem__)
    a, b = math.log(grid[max(best - 1, 0)]), math.log(grid[min(best + 1, points - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if nll(math.exp(c)) <= nll(math.exp(d)):
            b = d
        else:
            a = c
    return math.exp((a + b) / 2)
