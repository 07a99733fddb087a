"""The demo's data, built offline from reasoning-gym task families and the King James Bible text.

ScaleBiO story: five clean task families (the target, basic_arithmetic, among them), a corrupted copy of the target
family (every answer replaced by "."), and an off-domain source of real English; a validation and a test split of
the target. FIRST story: multiple-choice items of one family (train / held-out / test; the train ones also as
conversations to fine-tune on) and an out-of-domain test of another family.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmrefinery.config import SourceConfig
from lmrefinery.config.compare import CompareConfig
from lmrefinery.data.builders import corrupt_answers, kjv_records, mcq_items, reasoning_gym_records, write_jsonl
from lmrefinery.data.mcq_items import mcq_conversation

# Sizes of the data `demo` and `compare --demo_data` build. The evidence sizes are those the claims need: a target
# test set of ≥ 256 examples, ≥ 400 in-domain and ≥ 200 out-of-domain multiple-choice test items.
DATA_SIZES = {
    "quick": {"per_source": 16, "validation": 8, "test": 16, "mcq_train": 32, "mcq_heldout": 16, "mcq_test": 16,
              "mcq_ood_test": 16},
    "default": {"per_source": 32, "validation": 16, "test": 64, "mcq_train": 96, "mcq_heldout": 48, "mcq_test": 96,
                "mcq_ood_test": 48},
    "evidence": {"per_source": 64, "validation": 32, "test": 256, "mcq_train": 800, "mcq_heldout": 200,
                 "mcq_test": 400, "mcq_ood_test": 200},
}

TARGET = "basic_arithmetic"
# Small numbers keep the target within reach of a 135M model, so accuracy can move in a few steps.
EASY = {"basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        "chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}}
CLEAN = ("basic_arithmetic", "chain_sum", "leg_counting", "family_relationships", "syllogism")
CORRUPTED = "basic_arithmetic_corrupted"
OFF_DOMAIN = "kjv_text"
MCQ_FAMILY, MCQ_OOD_FAMILY = "basic_arithmetic", "chain_sum"


def layout(directory: Path) -> dict:
    """Where `build` writes each file, by role."""
    directory = Path(directory)
    paths = {"sources": {task: directory / f"{task}.jsonl" for task in (*CLEAN, CORRUPTED, OFF_DOMAIN)},
             "validation": directory / "target.validation.jsonl", "test": directory / "target.test.jsonl",
             "mcq": {split: directory / f"mcq.{split}.jsonl" for split in ("train", "heldout", "test", "ood_test")}}
    paths["mcq"]["train_conversations"] = directory / "mcq.train.conversations.jsonl"
    return paths


def _questions(path: Path) -> set[str]:
    """The questions already written to a built file (so that the next split avoids them)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row.get("question") or row["messages"][0]["content"].split("\n\n")[0] for row in rows}


def build(directory: Path, sizes: dict, seed: int) -> dict:
    """Write every file of `layout` (each skipped when present); return their paths by role. Within the target
    family, and within the multiple-choice family, no question appears in two files (no test item was trained on)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = layout(directory)
    n = sizes["per_source"]

    def once(path: Path, make) -> set[str]:
        if not path.exists():
            write_jsonl(path, make())
        return _questions(path)

    target_seen: set[str] = set()
    for offset, task in enumerate(CLEAN):
        questions = once(paths["sources"][task], lambda task=task, offset=offset: reasoning_gym_records(
            task, n, seed + 11 * offset, set(target_seen) if task == TARGET else None, **EASY.get(task, {})))
        if task == TARGET:
            target_seen |= questions
    target_seen |= once(paths["sources"][CORRUPTED], lambda: corrupt_answers(
        reasoning_gym_records(TARGET, n, seed + 500, set(target_seen), **EASY[TARGET]), 1.0, seed))
    once(paths["sources"][OFF_DOMAIN], lambda: kjv_records(n, seed))
    target_seen |= once(paths["validation"], lambda: reasoning_gym_records(
        TARGET, sizes["validation"], seed + 900, set(target_seen), **EASY[TARGET]))
    once(paths["test"], lambda: reasoning_gym_records(TARGET, sizes["test"], seed + 901, set(target_seen),
                                                      **EASY[TARGET]))
    mcq_seen: set[str] = set()
    for split, offset in (("train", 0), ("heldout", 1), ("test", 2)):
        mcq_seen |= once(paths["mcq"][split], lambda split=split, offset=offset: mcq_items(
            MCQ_FAMILY, sizes[f"mcq_{split}"], seed + 1000 + offset, exclude=set(mcq_seen),
            **EASY.get(MCQ_FAMILY, {})))
    once(paths["mcq"]["ood_test"], lambda: mcq_items(MCQ_OOD_FAMILY, sizes["mcq_ood_test"], seed + 1003,
                                                     exclude=set(), **EASY.get(MCQ_OOD_FAMILY, {})))
    once(paths["mcq"]["train_conversations"], lambda: [
        mcq_conversation(json.loads(line)) for line in paths["mcq"]["train"].read_text().splitlines()])
    return paths


def fill_compare_paths(config: CompareConfig, paths: dict) -> CompareConfig:
    """`compare` with `demo_data`: every source and split path the config leaves out, from the built files."""
    update = {}
    if config.mixture is not None:
        mixture = config.mixture
        update["mixture"] = mixture.model_copy(update={
            "sources": mixture.sources or [SourceConfig(name=name, path=str(path))
                                           for name, path in paths["sources"].items()],
            "noisy_sources": mixture.noisy_sources if mixture.sources else [CORRUPTED, OFF_DOMAIN],
            "validation": mixture.validation or [SourceConfig(name="target", path=str(paths["validation"]))],
            "test": mixture.test or [SourceConfig(name="target_test", path=str(paths["test"]))]})
    if config.distillation is not None:
        distillation, mcq = config.distillation, paths["mcq"]
        update["distillation"] = distillation.model_copy(update={
            "train_sources": distillation.train_sources or [SourceConfig(name="mcq",
                                                                         path=str(mcq["train_conversations"]))],
            "validation_items": distillation.validation_items or str(mcq["heldout"]),
            "test_items": distillation.test_items or str(mcq["test"]),
            "ood_test_items": distillation.ood_test_items or (None if distillation.test_items
                                                              else str(mcq["ood_test"]))})
    return config.model_copy(update=update)
