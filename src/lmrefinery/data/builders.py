"""Data builders for experiments on real task data that is generated offline.

`reasoning_gym_records` turns a reasoning-gym task family (gsm_symbolic, basic_arithmetic, chain_sum, leg_counting,
family_relationships, syllogism, …) into chat records (`messages` format) whose answers reasoning-gym's own scorer
accepts; `corrupt_answers` makes a noisy copy of a source with an exact corruption rate. Scale them up by raising
`count`, then point `sft` / `reweight` at the written JSONL files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmrefinery.errors import UserError
from lmrefinery.fileio import atomic_write_text

ANSWER_INSTRUCTION = "Reply with the final answer only."


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError:
        raise UserError("the data builders need the package reasoning-gym: pip install 'lmrefinery[demo]'") from None
    return reasoning_gym


def reasoning_gym_records(task: str, count: int, seed: int) -> list[dict]:
    """`count` chat records of one reasoning-gym task; `metadata` keeps what its scorer needs."""
    rg = _reasoning_gym()
    try:
        dataset = rg.create_dataset(task, size=count, seed=seed)
    except Exception as exc:  # reasoning-gym raises plain errors for unknown names or bad sizes
        raise UserError(f"reasoning-gym task '{task}': cannot generate ({exc})") from None
    records = []
    for index in range(count):
        item = dataset[index]
        records.append({
            "messages": [{"role": "user", "content": f"{item['question']}\n\n{ANSWER_INSTRUCTION}"},
                         {"role": "assistant", "content": str(item["answer"])}],
            "task": task, "answer": str(item["answer"]), "index": index, "seed": seed,
        })
    return records


def score_answer(task: str, seed: int, count: int, index: int, answer: str) -> float:
    """reasoning-gym's own score (1.0 = correct) of `answer` for item `index` of the dataset built with seed/count."""
    dataset = _reasoning_gym().create_dataset(task, size=count, seed=seed)
    return float(dataset.score_answer(answer, dataset[index]))


def corrupt_answers(records: list[dict], rate: float, seed: int, replacement: str = ".") -> list[dict]:
    """A copy where exactly round(rate × n) randomly chosen records have their final answer replaced."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"corruption rate must be in [0, 1], got {rate}")
    chosen = set(random.Random(seed).sample(range(len(records)), round(rate * len(records))))
    corrupted = []
    for index, record in enumerate(records):
        record = json.loads(json.dumps(record))
        if index in chosen:
            record["messages"][-1]["content"] = replacement
            record["corrupted"] = True
        corrupted.append(record)
    return corrupted


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path
