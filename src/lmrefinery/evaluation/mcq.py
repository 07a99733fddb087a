"""Multiple-choice QA scored at the answer position (docs/methods/first.md §7), with calibration.

Items (data/mcq_items.py) are shown through the prompt builder training uses (`ChatEncoder.prompt_ids`). The
prediction is the top-1 next token over the full vocabulary; it is correct iff it is a token of the gold letter ("A"
and " A" both count). Confidence is that token's full-vocabulary probability (the paper's definition); the
option-restricted view sums each letter's variant probabilities and renormalises over the options.
"""

from __future__ import annotations

import numpy as np
import torch

from lmrefinery.data.mcq_items import MCQItem
from lmrefinery.data.tokenize import ChatEncoder
from lmrefinery.errors import UserError
from lmrefinery.evaluation.calibration import (adaptive_calibration_error, brier_score, expected_calibration_error,
                                               maximum_calibration_error, negative_log_likelihood)
from lmrefinery.models.head import logits_at
from lmrefinery.train.precision import autocast


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


@torch.no_grad()
def answer_logits(model, encoder: ChatEncoder, items: list[MCQItem], batch_size: int, precision: str, device):
    """Yield (item indices, fp32 next-token logits at the answer position) one batch at a time."""
    model.eval()
    tokenizer = encoder.tokenizer
    encoded = [encoder.prompt_ids([{"role": "user", "content": item.prompt}]) for item in items]
    for start in range(0, len(items), batch_size):
        chunk = list(range(start, min(start + batch_size, len(items))))
        length = max(len(encoded[i]) for i in chunk)
        input_ids = torch.full((len(chunk), length), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, i in enumerate(chunk):
            input_ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            attention[row, : len(encoded[i])] = 1
        last = torch.zeros_like(input_ids, dtype=torch.bool)  # the answer position: each prompt's last token
        last[torch.arange(len(chunk)), torch.tensor([len(encoded[i]) - 1 for i in chunk])] = True
        with autocast(precision, device):
            logits = logits_at(model, last, input_ids=input_ids.to(device), attention_mask=attention.to(device))
        yield chunk, logits.float().cpu()


def option_variants(tokenizer, items: list[MCQItem]) -> list[list[list[int]]]:
    """Per item: the token ids that spell each option letter (see `letter_token_ids`)."""
    variants_of = {letters: letter_token_ids(tokenizer, list(letters)) for letters in {tuple(i.letters) for i in items}}
    return [variants_of[tuple(item.letters)] for item in items]


def score_items(model, encoder: ChatEncoder, items: list[MCQItem], batch_size: int, precision: str, device,
                temperature: float = 1.0) -> list[dict]:
    """Per item: prediction, correctness and confidence in the full-vocabulary and option-restricted views.
    `temperature` divides the logits before the softmax (post-hoc temperature scaling)."""
    results = []
    tokenizer = encoder.tokenizer
    variants_by_item = option_variants(tokenizer, items)
    for chunk, logits in answer_logits(model, encoder, items, batch_size, precision, device):
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


def mcq_metrics(results: list[dict], n_bins: int) -> dict:
    """Accuracy and calibration in both views: full-vocabulary top-1 token and option-restricted."""
    def view(correct_key, confidence_key, probabilities, gold_probabilities):
        correct = [float(r[correct_key]) for r in results]
        confidence = [r[confidence_key] for r in results]
        return {"accuracy": float(np.mean(correct)),
                "ece": expected_calibration_error(confidence, correct, n_bins),
                "adaptive_ece": adaptive_calibration_error(confidence, correct, n_bins),
                "mce": maximum_calibration_error(confidence, correct, n_bins),
                "brier": brier_score(probabilities, [r["gold_index"] for r in results]),
                "nll": negative_log_likelihood(gold_probabilities),
                "mean_confidence": float(np.mean(confidence))}

    widest = max(len(r["option_masses"]) for r in results)
    padded = lambda key: [r[key] + [0.0] * (widest - len(r[key])) for r in results]  # noqa: E731
    full = view("correct", "confidence", padded("option_masses"), [r["gold_probability"] for r in results])
    options = view("option_correct", "option_confidence", padded("option_probabilities"),
                   [r["option_probabilities"][r["gold_index"]] for r in results])
    return {"items": len(results), "full_vocabulary": full, "options": options,
            "format_misses": sum(r["predicted"] is None for r in results)}
