"""`lmrefinery demo`: fine-tuning on a real small LLM with real task data, on a laptop CPU.

Stages (each skipped when its output is complete, resumed when it was interrupted):
  data      reasoning-gym task families → one JSONL source each, plus a held-out test of each family
  baseline  evaluate the untouched model's loss on the test sets
  sft       fine-tune on the pooled sources (uniform over sources)
  evaluate  the fine-tuned model on the same test sets
The printed table compares held-out loss before and after; every stage's own command is printed for reuse.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lmrefinery.config import DemoConfig, EvaluateConfig, SFTConfig, validate_config
from lmrefinery.data.builders import reasoning_gym_records, write_jsonl
from lmrefinery.fileio import atomic_write_json
from lmrefinery.recipes import evaluate as evaluate_recipe
from lmrefinery.recipes import sft as sft_recipe

log = logging.getLogger(__name__)

MODEL = "smollm2-135m-instruct"
TASKS = ("basic_arithmetic", "chain_sum", "leg_counting")
PRESETS = {
    # examples per training source, per test source, optimizer steps, global batch, micro-batch, max tokens
    "quick": {"train": 24, "test": 8, "steps": 4, "batch": 8, "micro": 4, "max_length": 192},
    "default": {"train": 64, "test": 16, "steps": 12, "batch": 8, "micro": 4, "max_length": 256},
}


def _build_data(data_dir: Path, preset: dict, seed: int) -> dict[str, dict[str, Path]]:
    paths = {"train": {}, "test": {}}
    for offset, task in enumerate(TASKS):
        train_path, test_path = data_dir / f"{task}.train.jsonl", data_dir / f"{task}.test.jsonl"
        if not (train_path.exists() and test_path.exists()):
            records = reasoning_gym_records(task, preset["train"] + preset["test"], seed + 101 * offset)
            write_jsonl(train_path, records[: preset["train"]])
            write_jsonl(test_path, records[preset["train"]:])
        paths["train"][task], paths["test"][task] = train_path, test_path
    return paths


def _sources(paths: dict[str, Path]) -> list[dict]:
    return [{"name": task, "path": str(path)} for task, path in paths.items()]


def _evaluate(model: str, paths: dict[str, Path], output_dir: Path, preset: dict) -> dict:
    result_file = output_dir / "eval.json"
    if not result_file.exists():
        config = validate_config(EvaluateConfig, {
            "output_dir": str(output_dir), "model": {"name_or_path": model},
            "data": {"sources": _sources(paths), "max_length": preset["max_length"]}, "batch_size": 8})
        evaluate_recipe.run(config)
    return json.loads(result_file.read_text())


def run(config: DemoConfig, resume: bool = False) -> Path:
    preset = PRESETS[config.preset]
    out = Path(config.output_dir)
    paths = _build_data(out / "data", preset, config.seed)
    baseline = _evaluate(MODEL, paths["test"], out / "eval-base", preset)

    sft_dir = out / "sft"
    sft_tree = {
        "output_dir": str(sft_dir), "seed": config.seed, "model": {"name_or_path": MODEL},
        "data": {"sources": _sources(paths["train"]), "max_length": preset["max_length"]},
        "sampling": {"strategy": "uniform"},
        "validation": {"sources": _sources(paths["test"]), "every": preset["steps"], "batch_size": 8},
        "train": {"steps": preset["steps"], "batch_size": preset["batch"], "micro_batch_size": preset["micro"],
                  "lr": 1e-4, "warmup_steps": 1, "checkpoint_every": max(1, preset["steps"] // 2)},
    }
    if not (sft_dir / "summary.json").exists():
        sft_recipe.run(validate_config(SFTConfig, sft_tree), resume=(sft_dir / "checkpoints").exists())
    tuned = _evaluate(str(sft_dir / "model"), paths["test"], out / "eval-sft", preset)

    rows = [(task, baseline["per_source"][task]["loss"], tuned["per_source"][task]["loss"]) for task in TASKS]
    rows.append(("all", baseline["overall"]["loss"], tuned["overall"]["loss"]))
    summary = {"preset": config.preset, "model": MODEL, "sft_steps": preset["steps"],
               "held_out_loss": {name: {"before": before, "after": after} for name, before, after in rows}}
    atomic_write_json(out / "summary.json", summary)
    lines = ["", f"Held-out loss of {MODEL} before and after {preset['steps']} SFT steps:",
             f"  {'source':<18}{'before':>10}{'after':>10}"]
    lines += [f"  {name:<18}{before:>10.4f}{after:>10.4f}" for name, before, after in rows]
    lines += ["", "Outputs:",
              f"  data (JSONL, messages format)  {out / 'data'}",
              f"  fine-tuned model (HF format)   {sft_dir / 'model'}",
              f"  training metrics               {sft_dir / 'metrics.jsonl'}",
              f"  held-out evaluations           {out / 'eval-base' / 'eval.json'}, {out / 'eval-sft' / 'eval.json'}",
              f"  summary                        {out / 'summary.json'}",
              "", "Rerun a stage on your own model/data:",
              f"  lmrefinery sft --config {sft_dir / 'config.yaml'} output_dir=runs/my-sft model.name_or_path=MODEL",
              f"  lmrefinery evaluate --config {out / 'eval-sft' / 'config.yaml'} output_dir=runs/my-eval"]
    print("\n".join(lines))
    return out
