"""`lmrefinery compare`: the papers' baselines side by side, under one budget, on one test.

Mixture / selection (each makes an SFT set within one token budget from the same pool, then one pass of the same
SFT settings over it):
    uniform        equal weight per source                  proportional   weight ∝ source size
    less           best by LESS-style gradient similarity    rho            best by RHO-style excess loss
    scalebio       `reweight`, then `mix` with the learned weights
  each evaluated on the target's test set: loss, exact-match accuracy, token-level ECE and Brier.
Distillation (the same keep-layers student init, the same steps, batch and learning rate):
    sft, sft_temperature (post-hoc temperature fitted on validation, NLL), sft_label_smoothing, topk_kd (cache,
    no re-calibration), topk_kd_other (+ other bucket), online_kd (full vocabulary, live teacher), first
  each evaluated on the test MCQ items: accuracy, ECE, Brier, NLL (full-vocabulary view, the papers' definition).

Stages that several distillation methods need (teacher fine-tuning, teacher caches, the student init) run once, in
this process. Each method runs in its own fresh process, so its wall time and peak memory
are its own; its result.json marks it complete, so an interrupted comparison resumes with the next method.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import gc

import torch

from lmrefinery.config import SFTConfig, TeacherConfig, dump_config
from lmrefinery.config.compare import CompareConfig
from lmrefinery.errors import UserError
from lmrefinery.fileio import atomic_write_json, atomic_write_text
from lmrefinery.logs import configure_logging
from lmrefinery.recipes import compare_methods as methods
from lmrefinery.recipes import demo_data, sft, teacher
from lmrefinery.recipes.compare_report import write_report
from lmrefinery.recipes.stages import run_stage, save_student_init
from lmrefinery.train.precision import peak_memory_bytes

log = logging.getLogger(__name__)


def _in_child(function, *args) -> dict:
    """Runs in the method's own process: the result plus the process's wall time and peak memory."""
    configure_logging()
    start = time.perf_counter()
    result = function(*args)
    device = methods.device()
    result.update(wall_s=time.perf_counter() - start, peak_memory_bytes=peak_memory_bytes(device),
                  peak_memory_kind="accelerator allocated" if device.type == "cuda" else "process resident set")
    return result


def run_method(directory: Path, function, *args, isolate: bool = True) -> dict:
    """A method's result: read from result.json when complete, else computed (in a fresh process) and written."""
    done = directory / "result.json"
    if done.exists():
        log.info("method %s: already complete", directory.name)
        return json.loads(done.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    log.info("method %s: running", directory.name)
    if isolate:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            result = pool.submit(_in_child, function, *args).result()
    else:
        result = _in_child(function, *args)
    atomic_write_json(done, result)
    return result


def _check_budget(config: CompareConfig) -> None:
    if config.train.steps is None:
        raise UserError("compare: train.steps is required (every method gets the same number of optimizer steps)")


def _mixture(config: CompareConfig, out: Path, isolate: bool) -> dict:
    mixture = config.mixture
    results = {}
    for name in mixture.methods:
        results[name] = run_method(out / name, methods.MIXTURE[name], config, str(out / name), isolate=isolate)
    return results


def _shared_distillation_stages(config: CompareConfig, out: Path) -> dict:
    """Teacher (optionally fine-tuned), its caches of the training and validation conversations, the student init."""
    distillation = config.distillation
    timings = {}
    teacher_model = distillation.teacher.name_or_path
    train_data = {"sources": [s.model_dump() for s in distillation.train], "max_length": distillation.max_length}
    if distillation.teacher.finetune_steps:
        teacher_dir = out / "teacher-sft"
        train = config.train.model_dump(mode="json") | {"steps": distillation.teacher.finetune_steps,
                                                        "checkpoint_every": distillation.teacher.finetune_steps}
        start = time.perf_counter()
        run_stage(sft, SFTConfig, {"output_dir": str(teacher_dir), "seed": config.seed,
                                   "model": {"name_or_path": teacher_model}, "data": train_data, "train": train},
                  teacher_dir / "summary.json", teacher_dir)
        timings["teacher fine-tuning"] = time.perf_counter() - start
        teacher_model = str(teacher_dir / "model")
    validation_conversations = methods.write_mcq_conversations(distillation.validation_items,
                                                               out / "validation.conversations.jsonl")
    for stage, data in (("cache-train", train_data), ("cache-validation", {
            "sources": [{"name": "validation", "path": str(validation_conversations)}],
            "max_length": distillation.max_length})):
        start = time.perf_counter()
        run_stage(teacher, TeacherConfig, {"output_dir": str(out / stage), "seed": config.seed,
                                           "model": {"name_or_path": teacher_model}, "data": data,
                                           "k": distillation.k}, out / stage / "manifest.json")
        timings[f"teacher cache ({stage.removeprefix('cache-')})"] = time.perf_counter() - start
    if distillation.student.init == "model":  # every method starts from the given student
        student_init = distillation.student.name_or_path
    else:
        student_init = str(save_student_init(teacher_model, out / "student-init", distillation.student))
    _release_accelerator_memory()  # the methods run in their own processes: leave them the whole device
    return {"teacher": teacher_model, "cache_train": str(out / "cache-train"),
            "cache_validation": str(out / "cache-validation"), "student_init": student_init, "timings_s": timings}


def _release_accelerator_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _distillation(config: CompareConfig, out: Path, isolate: bool) -> tuple[dict, dict]:
    shared_path = out / "shared.json"
    if shared_path.exists():
        shared = json.loads(shared_path.read_text())
    else:
        shared = _shared_distillation_stages(config, out)
        atomic_write_json(shared_path, shared)
    results = {}
    methods_to_run = list(config.distillation.methods)
    if "sft_temperature" in methods_to_run and "sft" not in methods_to_run:
        methods_to_run.insert(methods_to_run.index("sft_temperature"), "sft")  # it scales sft's model
    for name in methods_to_run:
        inputs = {"sft_model": results["sft"]["model"]} if name == "sft_temperature" else {}
        results[name] = run_method(out / name, methods.DISTILLATION[name], config, shared, str(out / name),
                                   *inputs.values(), isolate=isolate)
    return {name: results[name] for name in config.distillation.methods}, shared


def run(config: CompareConfig, isolate: bool = True) -> Path:
    """`isolate=False` runs every method in this process (tests of the orchestration only: memory is then shared)."""
    _check_budget(config)
    out = Path(config.output_dir)
    resolved = dump_config(config)
    previous = out / "config.yaml"
    if previous.exists() and previous.read_text() != resolved:
        # finished methods are read back, not rerun: they must have been measured under this very config
        raise UserError(f"{previous}: {out} holds a comparison run with a different config; give a new "
                        f"output_dir (or delete it)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(previous, resolved)
    if config.demo_data is not None:
        config = demo_data.fill_compare_paths(config, demo_data.build(out / "data", demo_data.PRESETS[config.demo_data],
                                                                      config.seed))
    results = {"mixture": None, "distillation": None, "shared": None}
    if config.mixture is not None:
        results["mixture"] = _mixture(config, out / "mixture", isolate)
    if config.distillation is not None:
        results["distillation"], results["shared"] = _distillation(config, out / "distillation", isolate)
    report = write_report(out, config, results)
    print(report)
    return out
