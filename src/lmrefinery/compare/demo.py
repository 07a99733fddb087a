"""`lmrefinery demo`: both papers' stories on a real small LLM and real task data, on a laptop CPU.

The demo is `compare` at a small size, with the design of the evidence run (configs/compare-evidence.yaml):
ScaleBiO   reweight against a validation set of the target family → SFT on the learned mix vs the uniform mix under
           one token budget → the target's test loss and exact match, the paired difference with its 95% CI.
FIRST      fine-tune a teacher on multiple-choice items → cache its top-k → calibrate on held-out answer positions →
           distil the pretrained model from the re-calibrated cache, vs plain SFT of the same model → accuracy and
           ECE on in-domain and out-of-domain items, paired differences with their 95% CIs.
Every stage is skipped when its output is complete; the report (report.md, report.html, summary.json) says which
differences are significant at this size.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmrefinery.compare import run as compare
from lmrefinery.compare.demo_report import write_report
from lmrefinery.config import CompareConfig, DemoConfig, validate_config

# The quick preset is sized for ≤ 3 minutes on 2 CPU cores (it shows the pipeline, not the effects); the default
# one for ≤ 15 minutes from a fresh clone, install included.
PRESETS = {
    "quick": {"data": "quick", "max_length": 128, "seeds": [0],
              "train": {"steps": 2, "batch_size": 4, "micro_batch_size": 4, "lr": 1e-4},
              "mixture_examples": 8, "reweight_steps": 2, "lr_weights": 0.2, "teacher_steps": 2,
              "teacher_lr": 2e-4},
    "default": {"data": "default", "max_length": 192, "seeds": [0],
                "train": {"steps": 12, "batch_size": 8, "micro_batch_size": 8, "lr": 1e-4},
                "mixture_examples": 64, "reweight_steps": 12, "lr_weights": 0.15, "teacher_steps": 40,
                "teacher_lr": 2e-4},
}


def compare_tree(config: DemoConfig) -> dict:
    """The comparison the demo runs: ScaleBiO vs the uniform mix, FIRST vs SFT, on the demo's data."""
    preset = PRESETS[config.preset]
    max_length = config.max_length or preset["max_length"]
    return {
        "output_dir": config.output_dir, "seeds": [config.seed + s for s in preset["seeds"]], "data_seed": config.seed,
        "demo_data": preset["data"], "model": {"name_or_path": config.model},
        "train": preset["train"] | {"warmup_steps": 0}, "eval_batch_size": 16,
        "mixture": {
            "methods": ["uniform", "scalebio"], "max_length": max_length, "max_new_tokens": 8,
            "num_examples": preset["mixture_examples"],
            "reweight": {
                # α = 10 and a larger step for u and w than the paper's 1e-5: in a handful of steps the two copies
                # must drift apart enough for their per-source losses to tell the sources apart.
                "scalebio": {"alpha": 10, "lr_lower": 5e-5, "lr_upper": 5e-5, "lr_weights": preset["lr_weights"]},
                "train": {"steps": preset["reweight_steps"], "batch_size": 8, "val_batch_size": 4,
                          "micro_batch_size": 4, "warmup_ratio": 0.0, "schedule": "constant"},
                "lisa": {"enabled": True, "layers": 2, "interval": 2}}},
        "distillation": {
            "methods": ["sft", "first"], "max_length": max_length + 96,
            "teacher": {"name_or_path": config.model, "finetune_steps": preset["teacher_steps"],
                        "finetune_lr": preset["teacher_lr"]},
            "student": {"init": "model", "name_or_path": config.model}}}


def run(config: DemoConfig) -> Path:
    comparison = validate_config(CompareConfig, compare_tree(config), "demo preset")
    # One process for all four methods: a fresh one per method (compare's default, for per-method peak memory)
    # costs ≈ 9 s each of process start and imports, a twentieth of the quick preset's budget; the demo reports no
    # memory.
    out = compare.run(comparison, isolate=False)
    results = json.loads((out / "results.json").read_text())
    report = write_report(out, config, results)
    print(report["console"])
    return out
