"""The demo's data, built offline from reasoning-gym task families and the King James Bible text.

ScaleBiO story: five clean task families (the target, basic_arithmetic, among them), a corrupted copy of the target
family (every answer replaced by "."), and an off-domain source of real English; a validation and a test split of
the target. FIRST story: multiple-choice items of the target family (train / held-out / test), the train and
held-out ones also as conversations to fine-tune and to cache the teacher on.
"""

from __future__ import annotations

from pathlib import Path

from lmrefinery.config import SourceConfig
from lmrefinery.config.compare import CompareConfig
from lmrefinery.data.builders import corrupt_answers, kjv_records, mcq_items, reasoning_gym_records, write_jsonl
from lmrefinery.data.mcq_items import mcq_conversation

# "batch" is the SFT/teacher/student batch (mix_examples = sft_steps × batch: one pass over the mix). The quick preset
# is sized for ≤ 3 minutes on 2 CPU cores; only the default one is sized for the weights to find the noisy sources.
PRESETS = {
    "quick": {"per_source": 16, "validation": 8, "test": 8, "max_length": 128, "reweight_steps": 3,
              "reweight_batch": 8, "val_batch": 4, "lr_weights": 0.2, "mix_examples": 8, "sft_steps": 2,
              "batch": 4, "mcq_train": 16, "mcq_heldout": 8, "mcq_test": 8, "teacher_steps": 2, "distill_steps": 2,
              "keep_every": 3},
    "default": {"per_source": 32, "validation": 16, "test": 24, "max_length": 192, "reweight_steps": 8,
                "reweight_batch": 8, "val_batch": 4, "lr_weights": 0.15, "mix_examples": 64, "sft_steps": 8,
                "batch": 8, "mcq_train": 48, "mcq_heldout": 24, "mcq_test": 24, "teacher_steps": 8,
                "distill_steps": 8, "keep_every": 3},
}


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


def fill_compare_paths(config: CompareConfig, paths: dict) -> CompareConfig:
    """`compare` with `demo_data`: every source and split path the config leaves out, from the built files."""
    update = {}
    if config.mixture is not None:
        mixture = config.mixture
        update["mixture"] = mixture.model_copy(update={
            "sources": mixture.sources or [SourceConfig(name=name, path=str(path))
                                           for name, path in paths["sources"].items()],
            "validation": mixture.validation or [SourceConfig(name="target", path=str(paths["validation"]))],
            "test": mixture.test or [SourceConfig(name="target_test", path=str(paths["test"]))]})
    if config.distillation is not None:
        distillation, mcq = config.distillation, paths["mcq"]
        update["distillation"] = distillation.model_copy(update={
            "train": distillation.train or [SourceConfig(name="mcq", path=str(mcq["train_conversations"]))],
            "validation_items": distillation.validation_items or str(mcq["heldout"]),
            "test_items": distillation.test_items or str(mcq["test"])})
    return config.model_copy(update=update)
