"""`compare`'s distillation methods: the shared stages (teacher fine-tuning, its caches, FIRST's calibration, the
teacher's and the untrained student's scores) run once; each method then trains a student for one seed in its own
process and is scored on the in-domain and out-of-domain multiple-choice tests."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lmrefinery.baselines.temperature_scaling import fit_temperature
from lmrefinery.compare.stages import evaluate_mcq, run_stage, save_student_init, source_trees, train_tree
from lmrefinery.config import CalibrateConfig, CompareConfig, DistillConfig, ModelConfig, SFTConfig, TeacherConfig
from lmrefinery.data.mcq_items import load_items, mcq_conversation
from lmrefinery.data.tokenize import ChatEncoder
from lmrefinery.distill.losses import teacher_distribution
from lmrefinery.distill.temperature import gather_predictions
from lmrefinery.evaluation.mcq import answer_logits, option_variants
from lmrefinery.fileio import atomic_write_json, atomic_write_text
from lmrefinery.models import load_model, load_tokenizer
from lmrefinery.recipes import calibrate, distill, sft, teacher
from lmrefinery.recipes.common import load_cache_with_data
from lmrefinery.train.distributed import default_device


def test_sets(config: CompareConfig) -> dict[str, str]:
    """The multiple-choice tests every model is scored on: in-domain, and out-of-domain when given."""
    distillation = config.distillation
    tests = {"in_domain": distillation.test_items}
    if distillation.ood_test_items:
        tests["out_of_domain"] = distillation.ood_test_items
    return tests


def write_mcq_conversations(items_path: str, target: Path) -> Path:
    """MCQ items as training conversations whose prompt is exactly what the MCQ evaluation shows the model."""
    if not target.exists():
        atomic_write_text(target, "".join(json.dumps(mcq_conversation(item), ensure_ascii=False) + "\n"
                                          for item in load_items(items_path)))
    return target


def _score(config: CompareConfig, directory: Path, model_dir, temperature: float = 1.0) -> dict:
    return evaluate_mcq(directory, model_dir, test_sets(config), config.distillation.n_bins, temperature,
                        config.distillation.student.precision, config.eval_batch_size)


def _cache(config: CompareConfig, out: Path, name: str, teacher_model: str, sources: list[dict]) -> str:
    distillation = config.distillation
    run_stage(teacher, TeacherConfig, {
        "output_dir": str(out / name), "seed": config.data_seed, "model": {"name_or_path": teacher_model},
        "data": {"sources": sources, "max_length": distillation.max_length}, "k": distillation.k,
        "batch_size": config.eval_batch_size}, out / name / "manifest.json")
    return str(out / name)


def teacher_recalibration(cache_dir: str, calibration: dict) -> dict:
    """The teacher at the answer positions of a held-out test cache, before (its full-vocabulary top-1
    probability) and after FIRST's transform with the calibrated temperature: per-item confidences and
    correctness, for claim (d)."""
    cache, _, pool, _ = load_cache_with_data(cache_dir)
    logprobs, _, targets = gather_predictions(cache, pool.examples, "answer")
    after = teacher_distribution(logprobs, transform=calibration["transform"], temperature=calibration["temperature"])
    return {"correct": (targets == 0).double().tolist(), "confidence_before": logprobs[:, 0].exp().tolist(),
            "confidence_after": after[:, 0].tolist(), "temperature": calibration["temperature"],
            "transform": calibration["transform"]}


def shared_stages(config: CompareConfig, out: Path) -> dict:
    """Teacher (optionally fine-tuned), its caches (training data, validation items, test items), FIRST's
    calibration, the student init; the teacher's and the untrained student's test scores."""
    distillation = config.distillation
    timings, started = {}, time.perf_counter()
    teacher_model = distillation.teacher.name_or_path
    if distillation.teacher.finetune_steps:
        teacher_dir = out / "teacher-sft"
        steps = distillation.teacher.finetune_steps
        run_stage(sft, SFTConfig, {
            "output_dir": str(teacher_dir), "seed": config.data_seed, "model": {"name_or_path": teacher_model},
            "data": {"sources": source_trees(distillation.train_sources), "max_length": distillation.max_length},
            "train": train_tree(config, steps=steps, lr=distillation.teacher.finetune_lr or config.train.lr)},
            teacher_dir / "summary.json", teacher_dir)
        timings["teacher fine-tuning"] = time.perf_counter() - started
        teacher_model = str(teacher_dir / "model")
    started = time.perf_counter()
    caches = {"train": _cache(config, out, "cache-train", teacher_model, source_trees(distillation.train_sources))}
    for name, items in {"validation": distillation.validation_items, **test_sets(config)}.items():
        conversations = write_mcq_conversations(items, out / f"{name}.conversations.jsonl")
        caches[name] = _cache(config, out, f"cache-{name}", teacher_model,
                              [{"name": name, "path": str(conversations)}])
    timings["teacher caches"] = time.perf_counter() - started
    calibration_path = out / "calibrate" / "calibration.json"
    run_stage(calibrate, CalibrateConfig, distillation.calibrate.model_dump(mode="json") | {
        "output_dir": str(out / "calibrate"), "cache": caches["validation"]}, calibration_path)
    calibration = json.loads(calibration_path.read_text())
    if distillation.student.init == "model":  # every method starts from the given student
        student_init = distillation.student.name_or_path
    else:
        student_init = str(save_student_init(teacher_model, out / "student-init", distillation.student))
    started = time.perf_counter()
    scores = {"teacher": _score(config, out / "eval-teacher", teacher_model),
              "student_init": _score(config, out / "eval-student-init", student_init)}
    timings["teacher and init evaluation"] = time.perf_counter() - started
    recalibration = {name: teacher_recalibration(caches[name], calibration) for name in test_sets(config)}
    return {"teacher": teacher_model, "caches": caches, "calibration": str(calibration_path),
            "calibration_summary": {key: calibration[key] for key in ("transform", "temperature", "improves",
                                                                      "positions", "ece_before", "ece_after",
                                                                      "ece_after_cross_validated")},
            "student_init": student_init, "scores": scores, "recalibration": recalibration, "timings_s": timings}


def _student_sft(config: CompareConfig, seed: int, shared: dict, run_dir: Path, label_smoothing: float = 0.0) -> Path:
    distillation = config.distillation
    run_stage(sft, SFTConfig, {
        "output_dir": str(run_dir), "seed": seed,
        "model": {"name_or_path": shared["student_init"], **distillation.student.compute()},
        "data": {"sources": source_trees(distillation.train_sources), "max_length": distillation.max_length},
        "train": train_tree(config), "label_smoothing": label_smoothing}, run_dir / "summary.json", run_dir)
    return run_dir / "model"


def student_sft(config: CompareConfig, seed: int, shared: dict, directory: str) -> dict:
    directory = Path(directory)
    model_dir = _student_sft(config, seed, shared, directory / "run")
    return {"tests": _score(config, directory / "eval", model_dir), "model": str(model_dir)}


def student_sft_temperature(config: CompareConfig, seed: int, shared: dict, directory: str, sft_model: str) -> dict:
    """Post-hoc temperature scaling of the `sft` method's student of the same seed (the driver runs `sft` first and
    passes its model): T minimises the NLL of the gold letter on the validation items."""
    directory = Path(directory)
    precision = config.distillation.student.precision
    model_config = ModelConfig(name_or_path=sft_model, precision=precision)
    encoder = ChatEncoder(load_tokenizer(model_config))
    model = load_model(model_config, default_device(), training=False)
    items = load_items(config.distillation.validation_items)
    variants = option_variants(encoder.tokenizer, items)
    logits = torch.cat([chunk for _, chunk in answer_logits(model, encoder, items, config.eval_batch_size, precision,
                                                            default_device())])
    temperature = fit_temperature(logits, [variants[i][item.gold] for i, item in enumerate(items)])
    del model
    atomic_write_json(directory / "temperature.json", {"temperature": temperature, "objective": "nll",
                                                       "fitted_on": config.distillation.validation_items})
    return {"tests": _score(config, directory / "eval", sft_model, temperature), "temperature": temperature}


def student_sft_label_smoothing(config: CompareConfig, seed: int, shared: dict, directory: str) -> dict:
    directory = Path(directory)
    smoothing = config.distillation.label_smoothing
    model_dir = _student_sft(config, seed, shared, directory / "run", smoothing)
    return {"tests": _score(config, directory / "eval", model_dir), "label_smoothing": smoothing}


def _distill(config: CompareConfig, seed: int, shared: dict, directory: Path, loss: dict) -> dict:
    distillation = config.distillation
    run_dir = directory / "run"
    student = distillation.student.model_dump() | (
        {"init": "model", "name_or_path": shared["student_init"]} if distillation.student.init == "model" else {})
    loss = {"hard_label_weight": distillation.hard_label_weight} | loss if loss.get("mode") != "online" else loss
    run_stage(distill, DistillConfig, {
        "output_dir": str(run_dir), "seed": seed, "cache": shared["caches"]["train"], "student": student,
        "loss": loss, "train": train_tree(config)}, run_dir / "summary.json", run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"tests": _score(config, directory / "eval", run_dir / "model"),
            "student_topk_mass": summary.get("final_student_topk_mass"),
            "teacher_transform": summary["teacher_transform"], "temperature": summary["temperature"]}


def topk_kd(config: CompareConfig, seed: int, shared: dict, directory: str) -> dict:
    """Top-k KD from the cache as is (no temperature), with the other bucket."""
    return _distill(config, seed, shared, Path(directory), {"teacher_transform": "linear", "temperature": 1.0,
                                                            "other_bucket": True})


def topk_kd_restricted(config: CompareConfig, seed: int, shared: dict, directory: str) -> dict:
    """Top-k KD with the loss restricted to the k cached tokens."""
    return _distill(config, seed, shared, Path(directory), {"teacher_transform": "linear", "temperature": 1.0,
                                                            "other_bucket": False})


def online_kd(config: CompareConfig, seed: int, shared: dict, directory: str) -> dict:
    return _distill(config, seed, shared, Path(directory), {"mode": "online"})


def _first_loss(config: CompareConfig, shared: dict, other_bucket: bool) -> dict:
    return {"teacher_transform": config.distillation.calibrate.transform, "calibration": shared["calibration"],
            "other_bucket": other_bucket}


def first(config: CompareConfig, seed: int, shared: dict, directory: str) -> dict:
    """FIRST as `distill` ships it: the re-calibrated top-k cache (the temperature from the shared calibration stage)
    with the other bucket, so the student also learns how much mass the top-k hold."""
    return _distill(config, seed, shared, Path(directory), _first_loss(config, shared, other_bucket=True))


def first_restricted(config: CompareConfig, seed: int, shared: dict, directory: str) -> dict:
    """FIRST with the paper's loss, restricted to the k cached tokens."""
    return _distill(config, seed, shared, Path(directory), _first_loss(config, shared, other_bucket=False))


def first_hard_labels(config: CompareConfig, seed: int, shared: dict, directory: str) -> dict:
    """FIRST with a little cross-entropy on the true token: (1 − β)·KL + β·CE."""
    return _distill(config, seed, shared, Path(directory), _first_loss(config, shared, other_bucket=True)
                    | {"hard_label_weight": config.distillation.mixed_hard_label_weight})


METHODS = {"sft": student_sft, "sft_temperature": student_sft_temperature,
           "sft_label_smoothing": student_sft_label_smoothing, "topk_kd": topk_kd,
           "topk_kd_restricted": topk_kd_restricted, "online_kd": online_kd, "first": first,
           "first_restricted": first_restricted, "first_hard_labels": first_hard_labels}
DEPENDS_ON = {"sft_temperature": "sft"}  # it scales the sft student of the same seed
