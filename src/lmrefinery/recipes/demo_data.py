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


def layout(directory: Path) -> dict:
    """Where `build` writes each file, by role."""
    directory = Path(directory)
    paths = {"sources": {task: directory / f"{task}.jsonl" for task in (*CLEAN, CORRUPTED, OFF_DOMAIN)},
             "validation": directory / "target.validation.jsonl", "test": directory / "target.test.jsonl",
             "mcq": {}}
    for split in ("train", "heldout", "test"):
        paths["mcq"][split] = directory / f"mcq.{split}.jsonl"
        if split != "test":
            paths["mcq"][f"{split}_conversations"] = directory / f"mcq.{split}.conversations.jsonl"
    return paths


def build(directory: Path, sizes: dict, seed: int) -> dict:
    """Write every file of `layout` (each skipped when present); return their paths by role."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = layout(directory)
    n = sizes["per_source"]

    def once(path: Path, make) -> None:
        if not path.exists():
            write_jsonl(path, make())

    for offset, task in enumerate(CLEAN):
        once(paths["sources"][task], lambda task=task, offset=offset: reasoning_gym_records(
            task, n, seed + 11 * offset, **EASY.get(task, {})))
    once(paths["sources"][CORRUPTED],
         lambda: corrupt_answers(reasoning_gym_records(TARGET, n, seed + 500, **EASY[TARGET]), 1.0, seed))
    once(paths["sources"][OFF_DOMAIN], lambda: kjv_records(n, seed))
    once(paths["validation"],
         lambda: reasoning_gym_records(TARGET, sizes["validation"], seed + 900, **EASY[TARGET]))
    once(paths["test"], lambda: reasoning_gym_records(TARGET, sizes["test"], seed + 901, **EASY[TARGET]))
    for split, count, offset in (("train", sizes["mcq_train"], 0), ("heldout", sizes["mcq_heldout"], 1),
                                 ("test", sizes["mcq_test"], 2)):
        def items(count=count, offset=offset):  # generated only when a file is missing
            return mcq_items(TARGET, count, seed + 1000 + offset, **EASY[TARGET])

        once(paths["mcq"][split], items)
        if split != "test":
            once(paths["mcq"][f"{split}_conversations"], lambda items=items: [mcq_conversation(i) for i in items()])
    return paths
