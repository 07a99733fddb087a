"""The demo's data, built offline from reasoning-gym task families and the King James Bible text.

ScaleBiO story: five clean task families (the target, basic_arithmetic, among them), a corrupted copy of the target
family (every answer replaced by "."), and an off-domain source of real English; a validation and a test split of
the target. FIRST story: multiple-choice items of the target family (train / held-out / test), the train and
held-out ones also as conversations to fine-tune and to cache the teacher on.
"""

from __future__ import annotations

from pathlib import Path

from lmrefinery.data.builders import (corrupt_answers, kjv_records, mcq_conversation, mcq_items,
                                      reasoning_gym_records, write_jsonl)

TARGET = "basic_arithmetic"
# Small numbers keep the target within reach of a 135M model, so accuracy can move in a few steps.
EASY = {"basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        "chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}}
CLEAN = ("basic_arithmetic", "chain_sum", "leg_counting", "family_relationships", "syllogism")
CORRUPTED = "basic_arithmetic_corrupted"
OFF_DOMAIN = "kjv_text"


def build(directory: Path, sizes: dict, seed: int) -> dict:
    """Write every file (skipped when present); return their paths by role."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"sources": {}, "mcq": {}}
    n = sizes["per_source"]

    def once(path: Path, make) -> Path:
        if not path.exists():
            write_jsonl(path, make())
        return path

    for offset, task in enumerate(CLEAN):
        paths["sources"][task] = once(directory / f"{task}.jsonl",
                                      lambda task=task, offset=offset: reasoning_gym_records(
                                          task, n, seed + 11 * offset, **EASY.get(task, {})))
    paths["sources"][CORRUPTED] = once(
        directory / f"{CORRUPTED}.jsonl",
        lambda: corrupt_answers(reasoning_gym_records(TARGET, n, seed + 500, **EASY[TARGET]), 1.0, seed))
    paths["sources"][OFF_DOMAIN] = once(directory / f"{OFF_DOMAIN}.jsonl", lambda: kjv_records(n, seed))
    paths["validation"] = once(directory / "target.validation.jsonl",
                               lambda: reasoning_gym_records(TARGET, sizes["validation"], seed + 900, **EASY[TARGET]))
    paths["test"] = once(directory / "target.test.jsonl",
                         lambda: reasoning_gym_records(TARGET, sizes["test"], seed + 901, **EASY[TARGET]))
    for split, count, offset in (("train", sizes["mcq_train"], 0), ("heldout", sizes["mcq_heldout"], 1),
                                 ("test", sizes["mcq_test"], 2)):
        def items(count=count, offset=offset):  # generated only when a file is missing
            return mcq_items(TARGET, count, seed + 1000 + offset, **EASY[TARGET])

        paths["mcq"][split] = once(directory / f"mcq.{split}.jsonl", items)
        if split != "test":
            paths["mcq"][f"{split}_conversations"] = once(directory / f"mcq.{split}.conversations.jsonl",
                                                          lambda items=items: [mcq_conversation(i) for i in items()])
    return paths
