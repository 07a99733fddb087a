"""`lmrefinery evaluate`: `--task loss` (token-mean loss and perplexity, overall and per source), `--task mcq`
(multiple-choice accuracy and calibration), `--task exact_match` (greedy answers scored against references) or
`--task lm-eval` (lm-evaluation-harness tasks, with the calibration of the multiple-choice ones)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from lmrefinery.config import (EvaluateConfig, ExactMatchEvaluateConfig, LMEvalEvaluateConfig, LossEvaluateConfig,
                               MCQEvaluateConfig, dump_config)
from lmrefinery.data.mcq_items import load_items
from lmrefinery.data.tokenize import ChatEncoder
from lmrefinery.errors import UserError
from lmrefinery.evaluation.calibration import reliability_diagram
from lmrefinery.evaluation.exact_match import generate_answers, load_prompts, score
from lmrefinery.evaluation.lm_eval_run import run_tasks
from lmrefinery.evaluation.lm_eval_samples import calibration_report, summary_lines
from lmrefinery.evaluation.loss import evaluate_loss
from lmrefinery.evaluation.mcq import mcq_metrics, score_items
from lmrefinery.fileio import atomic_write_json, atomic_write_text, output_directory
from lmrefinery.models import load_model, load_tokenizer
from lmrefinery.recipes.common import load_data
from lmrefinery.train.rng import seed_everything
from lmrefinery.train.distributed import progress_bar, setup_distributed, shard_model

log = logging.getLogger(__name__)


def _loss(config: LossEvaluateConfig, env, output_dir: Path) -> dict:
    tokenizer, pool, _ = load_data(config.model, config.data)
    model = shard_model(load_model(config.model, env.device, training=False), env)
    batches = -(-len(pool.examples) // (config.batch_size * env.world_size))
    progress = progress_bar(env, batches, "evaluate")
    result = evaluate_loss(model, pool, env, config.batch_size, config.model.precision, tokenizer.pad_token_id,
                           progress, config.n_bins, pack_rows=config.packing)
    progress.close()
    per_example = result.pop("per_example")
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / "items.jsonl", "".join(
            json.dumps(row | {"loss": row["loss_sum"] / max(row["tokens"], 1)}) + "\n" for row in per_example))
        print(json.dumps({"overall": result["overall"],
                          "per_source": {k: v["loss"] for k, v in result["per_source"].items()}}, indent=2))
    return {"task": "loss", "model": config.model.name_or_path, "sources": pool.names, **result}


def _mcq(config: MCQEvaluateConfig, env, output_dir: Path) -> dict:
    encoder = ChatEncoder(load_tokenizer(config.model), config.data.system_prompt)
    per_source = {}
    items_by_source = {s.name: load_items(s.path, config.data.on_bad_record, s.split, s.subset)
                       for s in config.data.sources}
    model = load_model(config.model, env.device, training=False)
    all_results = []
    for name, items in items_by_source.items():
        results = score_items(model, encoder, items, config.batch_size, config.model.precision, env.device,
                              config.temperature)
        for result in results:
            result["source"] = name
        per_source[name] = mcq_metrics(results, config.n_bins)
        all_results += results
    overall = mcq_metrics(all_results, config.n_bins)
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / "items.jsonl", "".join(json.dumps(r) + "\n" for r in all_results))
        reliability_diagram([r["confidence"] for r in all_results], [float(r["correct"]) for r in all_results],
                            output_dir / "plots" / "reliability.png", config.n_bins,
                            "MCQ: full-vocabulary confidence")
        reliability_diagram([r["option_confidence"] for r in all_results],
                            [float(r["option_correct"]) for r in all_results],
                            output_dir / "plots" / "reliability-options.png", config.n_bins,
                            "MCQ: option-restricted confidence")
        print(json.dumps({"accuracy": overall["full_vocabulary"]["accuracy"], "ece": overall["full_vocabulary"]["ece"],
                          "option_accuracy": overall["options"]["accuracy"], "option_ece": overall["options"]["ece"]},
                         indent=2))
    return {"task": "mcq", "model": config.model.name_or_path, "sources": list(items_by_source), "overall": overall,
            "per_source": per_source}


def _exact_match(config: ExactMatchEvaluateConfig, env, output_dir: Path) -> dict:
    encoder = ChatEncoder(load_tokenizer(config.model), config.data.system_prompt)
    items_by_source = {s.name: load_prompts(s.path, s.split, s.subset) for s in config.data.sources}
    model = load_model(config.model, env.device, training=False)
    rows, per_source = [], {}
    for name, items in items_by_source.items():
        answers = generate_answers(model, encoder, items, config.batch_size, config.max_new_tokens, env.device)
        scores = [score(item, answer) for item, answer in zip(items, answers)]
        per_source[name] = {"accuracy": sum(s == 1.0 for s in scores) / len(scores),
                            "mean_score": sum(scores) / len(scores), "items": len(scores)}
        rows += [{"source": name, "location": i["location"], "reference": i["reference"], "answer": a, "score": s}
                 for i, a, s in zip(items, answers, scores)]
    overall = {"accuracy": sum(r["score"] == 1.0 for r in rows) / len(rows),
               "mean_score": sum(r["score"] for r in rows) / len(rows), "items": len(rows)}
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / "items.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        print(json.dumps({"accuracy": overall["accuracy"],
                          "per_source": {k: v["accuracy"] for k, v in per_source.items()}}, indent=2))
    return {"task": "exact_match", "model": config.model.name_or_path, "sources": list(items_by_source),
            "overall": overall, "per_source": per_source}


def _lm_eval(config: LMEvalEvaluateConfig, env, output_dir: Path) -> dict:
    """lm-eval's metrics as lm-eval reports them, and our calibration report of each multiple-choice task from the
    samples file lm-eval wrote in the same run (output_dir/lm-eval)."""
    if env.world_size > 1:
        raise UserError("evaluate --task lm-eval runs in one process (lm-eval parallelises by itself: `accelerate "
                        "launch -m lm_eval`)")
    model = load_model(config.model, env.device, training=False)
    staging, final = output_dir / ".lm-eval.partial", output_dir / "lm-eval"
    shutil.rmtree(staging, ignore_errors=True)
    ran = run_tasks(model, load_tokenizer(config.model), config.tasks, staging, batch_size=config.batch_size,
                    include_path=config.include_path, num_fewshot=config.num_fewshot, limit=config.limit,
                    apply_chat_template=config.apply_chat_template, seed=config.seed)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    multiple_choice = {task: final / path.name for task, path in ran["samples_files"].items()
                       if ran["output_types"].get(task) == "multiple_choice"}
    calibration = calibration_report(multiple_choice, output_dir, config.n_bins)
    lm_eval_metrics = {task: {key.split(",")[0]: value for key, value in metrics.items()
                              if isinstance(value, (int, float)) and not key.endswith("_stderr,none")
                              and "," in key}
                       for task, metrics in ran["results"].items()}
    print(json.dumps({"lm_eval": lm_eval_metrics, "calibration": summary_lines(calibration)}, indent=2))
    return {"task": "lm-eval", "model": config.model.name_or_path, "tasks": config.tasks, "lm_eval": lm_eval_metrics,
            "calibration": calibration}


TASKS = {"loss": _loss, "mcq": _mcq, "exact_match": _exact_match, "lm-eval": _lm_eval}


def run(config: EvaluateConfig) -> Path:
    env = setup_distributed()
    seed_everything(config.seed, env.rank)
    output_dir = output_directory(config.output_dir)
    report = TASKS[config.task](config, env, output_dir)
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output_dir / "eval.json", report)
        atomic_write_text(output_dir / "config.yaml", dump_config(config))
        log.info("wrote %s", output_dir / "eval.json")
    return output_dir
