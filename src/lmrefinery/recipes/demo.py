"""`lmrefinery demo`: both papers' stories on a real small LLM and real task data, on a laptop CPU.

ScaleBiO   data → reweight (learn source weights against a validation set of the target family) → mix (an SFT set
           with the learned weights, and one with uniform weights, same size) → sft on each → evaluate both on the
           target's test split (loss, and exact-match accuracy scored by reasoning-gym).
FIRST      sft a teacher on multiple-choice items → teacher cache (train and held-out items) → calibrate →
           distill a keep-layers student from the re-calibrated cache, and sft the same student init as the
           baseline → evaluate teacher and both students (accuracy, ECE, reliability diagrams).
Each stage is skipped when its output is complete and resumed when it was interrupted; the report (report.md,
report.html, summary.json) states what was measured, including when the learned mix does not win.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lmrefinery.config import (CalibrateConfig, DemoConfig, DistillConfig, MixConfig, ReweightConfig, SFTConfig,
                               StudentConfig, TeacherConfig)
from lmrefinery.recipes import calibrate, distill, mix, reweight, sft, teacher
from lmrefinery.recipes import demo_data
from lmrefinery.recipes.demo_report import write_report
from lmrefinery.recipes.stages import evaluate_answers, evaluate_mcq, run_stage, save_student_init

log = logging.getLogger(__name__)

def _sources(paths: dict) -> list[dict]:
    return [{"name": name, "path": str(path)} for name, path in paths.items()]


def scalebio_story(out: Path, paths: dict, preset: dict, model: str, seed: int) -> dict:
    data = {"sources": _sources(paths["sources"]), "max_length": preset["max_length"]}
    run = out / "reweight"
    run_stage(reweight, ReweightConfig, {
        "output_dir": str(run), "seed": seed, "model": {"name_or_path": model}, "data": data,
        "validation": {"sources": [{"name": "target", "path": str(paths["validation"])}]},
        # α = 10 and a larger step for u and w than the paper's 1e-5: in a handful of steps the two copies must
        # drift apart enough for their per-source losses to tell the sources apart.
        "scalebio": {"alpha": 10, "lr_lower": 5e-5, "lr_upper": 5e-5, "lr_weights": preset["lr_weights"]},
        "train": {"steps": preset["reweight_steps"], "batch_size": preset["reweight_batch"],
                  "val_batch_size": preset["val_batch"], "micro_batch_size": 4, "warmup_ratio": 0.0,
                  "schedule": "constant", "checkpoint_every": None},
        "lisa": {"enabled": True, "layers": 2, "interval": 2}}, run / "weights.json", run)
    learned = json.loads((run / "weights.json").read_text())["weights"]
    uniform = {name: 1.0 for name in learned}
    results = {"weights": learned}
    for label, weights in (("learned", learned), ("uniform", uniform)):
        mix_dir = out / f"mix-{label}"
        run_stage(mix, MixConfig, {"output_dir": str(mix_dir), "sources": data["sources"], "weights": weights,
                                   "num_examples": preset["mix_examples"], "seed": seed}, mix_dir / "manifest.json")
        sft_dir = out / f"sft-{label}"
        run_stage(sft, SFTConfig, {
            "output_dir": str(sft_dir), "seed": seed, "model": {"name_or_path": model},
            "data": {"sources": [{"name": "mix", "path": str(mix_dir / "mix.jsonl")}],
                     "max_length": preset["max_length"]},
            "train": {"steps": preset["sft_steps"], "batch_size": preset["batch"], "micro_batch_size": 4, "lr": 1e-4,
                      "warmup_steps": 0, "checkpoint_every": preset["sft_steps"]}}, sft_dir / "summary.json", sft_dir)
        results[label] = _evaluate_target(out / f"eval-{label}", sft_dir / "model", paths, preset)
    results["base"] = _evaluate_target(out / "eval-base", model, paths, preset)
    return results


def _evaluate_target(directory: Path, model, paths: dict, preset: dict) -> dict:
    return evaluate_answers(directory, model, [{"name": "target_test", "path": str(paths["test"])}],
                            preset["max_length"])


def first_story(out: Path, paths: dict, preset: dict, model: str, seed: int) -> dict:
    mcq = paths["mcq"]
    length = preset["max_length"] + 96  # multiple-choice prompts are longer
    train_data = {"sources": [{"name": "mcq", "path": str(mcq["train_conversations"])}], "max_length": length}
    teacher_dir = out / "teacher-sft"
    run_stage(sft, SFTConfig, {
        "output_dir": str(teacher_dir), "seed": seed, "model": {"name_or_path": model}, "data": train_data,
        "train": {"steps": preset["teacher_steps"], "batch_size": preset["batch"], "micro_batch_size": 4, "lr": 1e-4,
                  "warmup_steps": 0, "checkpoint_every": preset["teacher_steps"]}},
        teacher_dir / "summary.json", teacher_dir)
    teacher_model = {"name_or_path": str(teacher_dir / "model")}
    for name, source in (("cache", train_data), ("cache-heldout", {
            "sources": [{"name": "heldout", "path": str(mcq["heldout_conversations"])}], "max_length": length})):
        run_stage(teacher, TeacherConfig, {"output_dir": str(out / name), "model": teacher_model, "data": source,
                                           "k": 5}, out / name / "manifest.json")
    run_stage(calibrate, CalibrateConfig, {"output_dir": str(out / "calibrate"),
                                           "cache": str(out / "cache-heldout")}, out / "calibrate" / "calibration.json")
    common_train = {"steps": preset["distill_steps"], "batch_size": preset["batch"], "micro_batch_size": 4, "lr": 2e-4,
                    "warmup_steps": 0, "checkpoint_every": preset["distill_steps"]}
    student = {"init": "keep-layers", "keep_every": preset["keep_every"]}
    first_dir = out / "student-first"
    run_stage(distill, DistillConfig, {
        "output_dir": str(first_dir), "seed": seed, "cache": str(out / "cache"), "student": student,
        "loss": {"teacher_transform": "prob_temperature",
                 "calibration": str(out / "calibrate" / "calibration.json")},
        "train": common_train}, first_dir / "summary.json", first_dir)
    # The fine-tuning baseline: the same student init trained on the gold answers (linear transform at c = 1 on a
    # one-hot target is exactly cross-entropy, so use sft on a saved copy of the init).
    init_dir = save_student_init(teacher_dir / "model", out / "student-init",
                                 StudentConfig(keep_every=preset["keep_every"]))
    sft_student = out / "student-sft"
    run_stage(sft, SFTConfig, {"output_dir": str(sft_student), "seed": seed,
                               "model": {"name_or_path": str(init_dir)}, "data": train_data, "train": common_train},
              sft_student / "summary.json", sft_student)
    results = {"calibration": json.loads((out / "calibrate" / "calibration.json").read_text())}
    for label, model_dir in (("teacher", teacher_dir / "model"), ("student_sft", sft_student / "model"),
                             ("student_first", first_dir / "model")):
        results[label] = evaluate_mcq(out / f"eval-mcq-{label}", model_dir, mcq["test"])
    return results


def run(config: DemoConfig) -> Path:
    preset = dict(demo_data.PRESETS[config.preset])
    if config.max_length is not None:
        preset["max_length"] = config.max_length
    out = Path(config.output_dir)
    paths = demo_data.build(out / "data", preset, config.seed)
    scalebio_results = scalebio_story(out / "scalebio", paths, preset, config.model, config.seed)
    first_results = first_story(out / "first", paths, preset, config.model, config.seed)
    report = write_report(out, config, preset, paths, scalebio_results, first_results)
    print(report["console"])
    return out
