"""The experiment data `compare` builds from its `data` section (or a `demo_data` preset), offline, from reasoning-gym
task families and the King James Bible text.

ScaleBiO story: the target family and other clean families; noise sources (a copy of a family with "." answers or
with its answers permuted among its questions, or off-domain English); optionally the target cut into partitions
corrupted at increasing rates; a validation and a test split of the target. FIRST story: multiple-choice items of one
family (train / held-out / test; the train ones also as conversations to fine-tune on) and an out-of-domain test of
another. Which families, settings and sizes: config/experiment.py — nothing here names a family.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmrefinery.config import SourceConfig
from lmrefinery.config.compare import CompareConfig, PartitionSpec
from lmrefinery.config.experiment import ExperimentDataConfig, FamilyConfig, noise_name
from lmrefinery.data.builders import (corrupt_answers, derange_answers, kjv_records, mcq_items, reasoning_gym_records,
                                      write_jsonl)
from lmrefinery.data.mcq_items import mcq_conversation

# Seed offsets of each kind of file, fixed so that a preset always builds the same data.
CLEAN_SEED, NOISE_SEED, PARTITION_SEED, VALIDATION_SEED, TEST_SEED, MCQ_SEED = 11, 500, 600, 900, 901, 1000


def partition_name(family: FamilyConfig, kind: str, rate: float) -> str:
    return f"{family.source_name}_{kind}_{rate:g}"


def layout(directory: Path, data: ExperimentDataConfig) -> dict:
    """Where `build` writes each file, by role."""
    directory = Path(directory)
    paths: dict = {"sources": {}, "partitions": {}, "mcq": {}}
    mixture = data.mixture
    if mixture is not None:
        for family in [mixture.target, *mixture.clean]:
            paths["sources"][family.source_name] = directory / f"{family.source_name}.jsonl"
        for noise in mixture.noise:
            name = noise_name(noise, mixture.target)
            paths["sources"][name] = directory / f"{name}.jsonl"
        for kind in (mixture.partitions.kinds if mixture.partitions else []):
            for rate in mixture.partitions.rates:
                name = partition_name(mixture.target, kind, rate)
                paths["partitions"][name] = (kind, rate)
                paths["sources"][name] = directory / f"{name}.jsonl"
        paths["validation"] = directory / "target.validation.jsonl"
        paths["test"] = directory / "target.test.jsonl"
    if data.mcq is not None:
        paths["mcq"] = {split: directory / f"mcq.{split}.jsonl" for split in ("train", "heldout", "test")}
        if data.mcq.out_of_domain is not None:
            paths["mcq"]["ood_test"] = directory / "mcq.ood_test.jsonl"
        paths["mcq"]["train_conversations"] = directory / "mcq.train.conversations.jsonl"
    return paths


def _questions(path: Path) -> set[str]:
    """The questions already written to a built file (so that the next split avoids them)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row.get("question") or row["messages"][0]["content"].split("\n\n")[0] for row in rows}


def _once(path: Path, make) -> set[str]:
    if not path.exists():
        write_jsonl(path, make())
    return _questions(path)


def _records(family: FamilyConfig, count: int, seed: int, exclude: set[str] | None) -> list[dict]:
    return reasoning_gym_records(family.family, count, seed, None if exclude is None else set(exclude),
                                 **family.settings)


def _noisy_copy(kind: str, rate: float, records: list[dict], seed: int) -> list[dict]:
    return corrupt_answers(records, rate, seed) if kind == "dot" else derange_answers(records, rate, seed)


def _build_mixture(paths: dict, data: ExperimentDataConfig, seed: int) -> None:
    mixture = data.mixture
    target, n = mixture.target, mixture.per_source
    families = {family.family: family for family in [*mixture.clean, target]}  # the target's settings win
    seen: dict[str, set[str]] = {}  # per family: questions already used, so that no split repeats one
    for offset, family in enumerate([target, *mixture.clean]):
        distinct = family.family == target.family
        questions = _once(paths["sources"][family.source_name], lambda family=family, offset=offset: _records(
            family, n, seed + CLEAN_SEED * offset, seen.get(family.family, set()) if distinct else None))
        if distinct:
            seen.setdefault(family.family, set()).update(questions)
    for index, noise in enumerate(mixture.noise):
        path = paths["sources"][noise_name(noise, target)]
        if noise.kind == "off_domain":
            _once(path, lambda: kjv_records(n, seed))
            continue
        family = families.get(noise.family or target.family) or FamilyConfig(family=noise.family)
        seen.setdefault(family.family, set()).update(_once(path, lambda family=family, index=index, noise=noise: (
            _noisy_copy(noise.kind, noise.rate, _records(family, n, seed + NOISE_SEED + 7 * index,
                                                          seen.setdefault(family.family, set())), seed))))
    for index, (name, (kind, rate)) in enumerate(paths["partitions"].items()):
        seen[target.family] |= _once(paths["sources"][name], lambda index=index, kind=kind, rate=rate: _noisy_copy(
            kind, rate, _records(target, mixture.partitions.per_partition, seed + PARTITION_SEED + 13 * index,
                                 seen[target.family]), seed + index))
    seen[target.family] |= _once(paths["validation"], lambda: _records(
        target, mixture.validation, seed + VALIDATION_SEED, seen[target.family]))
    _once(paths["test"], lambda: _records(target, mixture.test, seed + TEST_SEED, seen[target.family]))


def _build_mcq(paths: dict, data: ExperimentDataConfig, seed: int) -> None:
    mcq, seen = data.mcq, set()
    for offset, split in enumerate(("train", "heldout", "test")):
        seen |= _once(paths["mcq"][split], lambda split=split, offset=offset: mcq_items(
            mcq.in_domain.family, getattr(mcq, split), seed + MCQ_SEED + offset, exclude=set(seen),
            **mcq.in_domain.settings))
    if mcq.out_of_domain is not None:
        _once(paths["mcq"]["ood_test"], lambda: mcq_items(mcq.out_of_domain.family, mcq.ood_test, seed + MCQ_SEED + 3,
                                                           exclude=set(), **mcq.out_of_domain.settings))
    _once(paths["mcq"]["train_conversations"], lambda: [
        mcq_conversation(json.loads(line)) for line in paths["mcq"]["train"].read_text().splitlines()])


def build(directory: Path, data: ExperimentDataConfig, seed: int) -> dict:
    """Write every file of `layout` (each skipped when present); return their paths by role. Within the target
    family, and within the multiple-choice family, no question appears in two files (no test item was trained on)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = layout(directory, data)
    if data.mixture is not None:
        _build_mixture(paths, data, seed)
    if data.mcq is not None:
        _build_mcq(paths, data, seed)
    return paths


def fill_compare_paths(config: CompareConfig, data: ExperimentDataConfig, paths: dict) -> CompareConfig:
    """`compare` with built data: every source and split path the config leaves out, from the built files."""
    update = {}
    if config.mixture is not None and data.mixture is not None:
        mixture = config.mixture
        noisy = [noise_name(noise, data.mixture.target) for noise in data.mixture.noise]
        update["mixture"] = mixture.model_copy(update={
            "sources": mixture.sources or [SourceConfig(name=name, path=str(path))
                                           for name, path in paths["sources"].items()],
            "noisy_sources": mixture.noisy_sources if mixture.sources else noisy,
            "partitions": mixture.partitions if mixture.sources else [
                PartitionSpec(name=name, kind=kind, rate=rate) for name, (kind, rate) in paths["partitions"].items()],
            "validation": mixture.validation or [SourceConfig(name="target", path=str(paths["validation"]))],
            "test": mixture.test or [SourceConfig(name="target_test", path=str(paths["test"]))]})
    if config.distillation is not None and data.mcq is not None:
        distillation, mcq = config.distillation, paths["mcq"]
        update["distillation"] = distillation.model_copy(update={
            "train_sources": distillation.train_sources or [SourceConfig(name="mcq",
                                                                         path=str(mcq["train_conversations"]))],
            "validation_items": distillation.validation_items or str(mcq["heldout"]),
            "test_items": distillation.test_items or str(mcq["test"]),
            "ood_test_items": distillation.ood_test_items or (None if distillation.test_items
                                                              else (str(mcq["ood_test"]) if "ood_test" in mcq
                                                                    else None))})
    return config.model_copy(update=update)
