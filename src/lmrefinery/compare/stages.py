"""Multi-stage pipelines (`demo`, `compare`) run commands as stages: each is skipped when its output is complete and
resumed when an interrupted run left checkpoints. Also the stages both pipelines share."""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from pathlib import Path

from lmrefinery.config import EvaluateConfig, ModelConfig, StudentConfig, validate_config
from lmrefinery.distill.student import every_nth, keep_layers
from lmrefinery.fileio import atomic_directory
from lmrefinery.models import find_decoder_layers, load_model, load_tokenizer
from lmrefinery.recipes import evaluate
from lmrefinery.train.run_dir import release_run_locks

log = logging.getLogger(__name__)


def source_trees(sources) -> list[dict]:
    """Source configs as the config trees of a stage."""
    return [s.model_dump() for s in sources]


def train_tree(config, **changes) -> dict:
    """A comparison's shared `train` settings as a stage's. Without `train.checkpoint_every` a stage writes no
    checkpoint: a finished stage's checkpoints are deleted (run_stage), and one written only at the end never serves
    a resume — it cost a stage of the 135M model ~25 s of writing 1.6 GB of optimizer state."""
    return config.train.model_dump(mode="json") | no_final_checkpoint(config.train) | changes


def no_final_checkpoint(schedule) -> dict:
    """A stage schedule's checkpoint settings: periodic ones only where the comparison's config asks for them."""
    return {"checkpoint_at_end": schedule.checkpoint_every is not None}


def run_stage(recipe, config_class, tree: dict, done: Path, resume_from: Path | None = None) -> None:
    """Run one stage unless `done` exists. An interrupted stage resumes from its checkpoints (or, for a teacher
    cache, its finished shards); one interrupted before any of those is started afresh."""
    if done.exists():
        log.info("stage %s: already complete", tree["output_dir"])
        return
    output = Path(tree["output_dir"])
    resume = (resume_from is not None and (resume_from / "checkpoints").exists()) or any(output.glob("shard-*"))
    if output.exists() and not resume:
        shutil.rmtree(output)  # nothing to resume from: a partial run directory would only be refused
    config = validate_config(config_class, tree)
    try:
        if "resume" in inspect.signature(recipe.run).parameters:
            recipe.run(config, resume=resume)
        else:
            recipe.run(config)
    finally:
        release_run_locks()  # the stage is over: its directory is free for the next run
    if resume_from is not None:  # finished: its checkpoints only served resuming (they hold GBs of optimizer state)
        shutil.rmtree(resume_from / "checkpoints", ignore_errors=True)


def _items(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate_answers(directory: Path, model: str | Path, test_sources: list[dict], max_length: int,
                     exact_match: bool = True, max_new_tokens: int = 12, precision: str = "auto",
                     batch_size: int = 8) -> dict:
    """Held-out loss (with token-level calibration) and, optionally, exact-match accuracy of greedy answers; with
    `per_item` (in test-set order): each example's token-loss sum, token count and own token-mean loss, and its
    exact-match score."""
    common = {"model": {"name_or_path": str(model), "precision": precision}, "batch_size": batch_size}
    run_stage(evaluate, EvaluateConfig, {"output_dir": str(directory / "loss"), "task": "loss", **common,
                                         "data": {"sources": test_sources, "max_length": max_length}},
              directory / "loss" / "eval.json")
    loss = json.loads((directory / "loss" / "eval.json").read_text())["overall"]
    rows = _items(directory / "loss" / "items.jsonl")
    per_item = {"loss_sum": [row["loss_sum"] for row in rows], "tokens": [row["tokens"] for row in rows],
                "example_loss": [row["loss"] for row in rows]}
    result = {"test_loss": loss["loss"], "token_accuracy": loss["token_accuracy"], "token_ece": loss["token_ece"],
              "token_brier": loss["token_brier"]}
    if exact_match:
        run_stage(evaluate, EvaluateConfig, {"output_dir": str(directory / "exact"), "task": "exact_match",
                                             "max_new_tokens": max_new_tokens, **common,
                                             "data": {"sources": test_sources}},
                  directory / "exact" / "eval.json")
        exact = json.loads((directory / "exact" / "eval.json").read_text())["overall"]
        result.update(exact_match=exact["accuracy"], mean_score=exact["mean_score"])
        per_item["exact_match"] = [float(row["score"] == 1.0) for row in _items(directory / "exact" / "items.jsonl")]
    return result | {"per_item": per_item}


MCQ_ITEM_KEYS = ("correct", "confidence", "gold_probability", "option_correct", "option_confidence")


def evaluate_mcq(directory: Path, model: str | Path, item_files: dict[str, str | Path], n_bins: int = 10,
                 temperature: float = 1.0, precision: str = "auto", batch_size: int = 8) -> dict:
    """Multiple-choice accuracy and calibration per named item file (e.g. in-domain and out-of-domain), each with
    `per_item` values (in file order) for the statistics."""
    run_stage(evaluate, EvaluateConfig, {
        "output_dir": str(directory), "task": "mcq", "model": {"name_or_path": str(model), "precision": precision},
        "data": {"sources": [{"name": name, "path": str(path)} for name, path in item_files.items()]},
        "batch_size": batch_size, "n_bins": n_bins, "temperature": temperature}, directory / "eval.json")
    report = json.loads((directory / "eval.json").read_text())
    rows = _items(directory / "items.jsonl")
    result = {}
    for name in item_files:
        metrics = report["per_source"][name]
        mine = [row for row in rows if row["source"] == name]
        result[name] = {"accuracy": metrics["full_vocabulary"]["accuracy"], "ece": metrics["full_vocabulary"]["ece"],
                        "brier": metrics["full_vocabulary"]["brier"], "nll": metrics["full_vocabulary"]["nll"],
                        "option_accuracy": metrics["options"]["accuracy"], "option_ece": metrics["options"]["ece"],
                        "format_misses": metrics["format_misses"],
                        "per_item": {key: [float(row[key]) for row in mine] for key in MCQ_ITEM_KEYS}}
    return result


def save_student_init(teacher_dir: str | Path, target: Path, student: StudentConfig) -> Path:
    """The keep-layers student — blocks of the teacher, or of `student.keep_layers_from` — saved as an HF model, so
    baselines that fine-tune it start from the same weights that `distill` builds."""
    if (target / "config.json").exists():
        return target
    config = ModelConfig(name_or_path=student.keep_layers_from or str(teacher_dir))
    model = load_model(config)
    indices = student.keep_layers or every_nth(len(find_decoder_layers(model)), student.keep_every)
    small = keep_layers(model, indices, in_place=True)
    with atomic_directory(target) as tmp:
        small.save_pretrained(tmp)
        load_tokenizer(config).save_pretrained(tmp)
    return target
