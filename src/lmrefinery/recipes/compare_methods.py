"""One function per method of `lmrefinery compare`. Each runs in its own process: it takes the validated config and its
directory, runs its stages (each skipped when complete) and returns its measured numbers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from lmrefinery.baselines.less import CountSketch, cosine_to_mean, gradient_features, last_block_parameters
from lmrefinery.baselines.mixture import fill_budget, mixture_within_budget, rank_by_score
from lmrefinery.baselines.rho import example_losses, excess_loss
from lmrefinery.baselines.temperature_scaling import fit_temperature
from lmrefinery.config import CalibrateConfig, DataConfig, DistillConfig, ModelConfig, ReweightConfig, SFTConfig
from lmrefinery.config.compare import CompareConfig
from lmrefinery.data.mcq_items import load_items, mcq_conversation
from lmrefinery.data.sources import read_conversations
from lmrefinery.data.tokenize import ChatEncoder
from lmrefinery.evaluation.mcq import answer_logits, option_variants
from lmrefinery.fileio import atomic_write_json, atomic_write_text
from lmrefinery.models import load_model, load_tokenizer
from lmrefinery.recipes import calibrate, distill, reweight, sft
from lmrefinery.recipes.common import load_data
from lmrefinery.recipes.stages import evaluate_answers, evaluate_mcq, run_stage
from lmrefinery.train.distributed import DistEnv, progress_bar


def _dump_sources(sources) -> list[dict]:
    return [s.model_dump() for s in sources]


def _budget(config: CompareConfig) -> dict:
    return config.train.model_dump(mode="json") | {"checkpoint_every": config.train.checkpoint_every
                                                   or config.train.steps}


def _sft_examples(config: CompareConfig) -> int:
    return config.mixture.num_examples or config.train.steps * config.train.batch_size


def token_budget(config: CompareConfig, pool) -> int:
    """Tokens every mixture method's SFT set may hold: `mixture.token_budget`, else N examples of the pool's mean
    length (N = num_examples, default train.steps × train.batch_size)."""
    if config.mixture.token_budget is not None:
        return config.mixture.token_budget
    mean_length = sum(len(e.input_ids) for e in pool.examples) / len(pool.examples)
    return round(_sft_examples(config) * mean_length)


# ----------------------------------------------------------------------------------------------- mixture / selection

def _sft_on(config: CompareConfig, directory: Path, pool, chosen: list[int], extra: dict | None = None) -> dict:
    """The shared budget: one pass of SFT of the base model over the chosen pool examples (their records, each
    tagged with its source), then the target's test metrics."""
    mixture = config.mixture
    records = _pool_records(config, pool)
    data_path = directory / "selected.jsonl"
    atomic_write_text(data_path, "".join(json.dumps(records[i], ensure_ascii=False) + "\n" for i in chosen))
    steps = len(chosen) // config.train.batch_size
    run_dir = directory / "sft"
    run_stage(sft, SFTConfig, {
        "output_dir": str(run_dir), "seed": config.seed, "model": config.model.model_dump(),
        "data": {"sources": [{"name": "selected", "path": str(data_path)}], "max_length": mixture.max_length},
        "train": _budget(config) | {"steps": steps, "checkpoint_every": steps}}, run_dir / "summary.json", run_dir)
    metrics = evaluate_answers(directory / "eval", run_dir / "model", _dump_sources(mixture.test),
                               mixture.max_length, mixture.exact_match, mixture.max_new_tokens,
                               config.model.precision)
    counts = pool.counts(chosen)
    return metrics | {"sft_examples": len(chosen), "sft_steps": steps, "examples_per_source": counts,
                      "token_budget": token_budget(config, pool),
                      "sft_tokens": sum(len(pool.examples[i].input_ids) for i in chosen)} | (extra or {})


def _pool_records(config: CompareConfig, pool) -> list[dict]:
    """Each pool example's record as a conversation tagged with its source (the form `mix` writes and SFT reads)."""
    conversations = {s.name: read_conversations(s) for s in config.mixture.sources}
    return [{**conversations[pool.names[e.source_id]][e.record], "source": pool.names[e.source_id]}
            for e in pool.examples]


def _mix_and_sft(config: CompareConfig, directory: Path, weights: dict[str, float]) -> dict:
    """A weighted mixture that fills the token budget (drawn as `mix` draws: each source without replacement until
    it runs out, then with replacement), then SFT on it."""
    pool = _load_pools(config)[1]
    per_source = pool.source_indices()
    total = sum(weights[name] for name in pool.names)
    probabilities = [weights[name] / total for name in pool.names]
    drawn = mixture_within_budget([len(indices) for indices in per_source], probabilities,
                                  lambda source, index: len(pool.examples[per_source[source][index]].input_ids),
                                  token_budget(config, pool), config.train.batch_size, config.seed)
    return _sft_on(config, directory, pool, [per_source[source][index] for source, index in drawn])


def uniform(config: CompareConfig, directory: str) -> dict:
    return _mix_and_sft(config, Path(directory), {s.name: 1.0 for s in config.mixture.sources})


def proportional(config: CompareConfig, directory: str) -> dict:
    pool = _load_pools(config)[1]
    return _mix_and_sft(config, Path(directory), dict(zip(pool.names, map(float, pool.sizes))))


def _load_pools(config: CompareConfig):
    mixture = config.mixture
    data = DataConfig(sources=mixture.sources, max_length=mixture.max_length)
    tokenizer, pool, extras = load_data(config.model, data, {"validation": mixture.validation})
    return tokenizer, pool, extras["validation"]


def saved_scores(directory: Path, pool) -> torch.Tensor | None:
    """The scores an interrupted run of this method already wrote (scoring is the expensive part), if complete."""
    path = directory / "scores.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if len(rows) != len(pool.examples):
        return None
    return torch.tensor([row["score"] for row in rows], dtype=torch.float64)


def select_within_budget(config: CompareConfig, pool, scores: torch.Tensor, directory: Path) -> list[int]:
    """The highest-scoring examples that fit the token budget (whole batches), in a seeded shuffled order; writes
    every example's score."""
    order = rank_by_score(scores)
    count = fill_budget([len(pool.examples[i].input_ids) for i in order], token_budget(config, pool),
                        config.train.batch_size)
    chosen = order[:count]
    selected = set(chosen)
    rows = [{"source": pool.names[e.source_id], "record": e.record, "score": float(scores[i]),
             "selected": i in selected} for i, e in enumerate(pool.examples)]
    atomic_write_text(directory / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    random.Random(config.seed).shuffle(chosen)
    return chosen


def less_scores(config: CompareConfig, model, pool, validation, pad_id: int) -> torch.Tensor:
    settings = config.mixture.less
    parameters = last_block_parameters(model, settings.layers)
    sketch = CountSketch([p.numel() for p in parameters], settings.dim, config.seed, parameters[0].device)
    precision = config.model.precision
    progress = _progress(len(pool.examples) + len(validation.examples), "LESS gradient features")
    train_features = gradient_features(model, pool, sketch, parameters, precision, pad_id, progress)
    validation_features = gradient_features(model, validation, sketch, parameters, precision, pad_id, progress)
    progress.close()
    return cosine_to_mean(train_features, validation_features)


def less(config: CompareConfig, directory: str) -> dict:
    directory = Path(directory)
    tokenizer, pool, validation = _load_pools(config)
    scores = saved_scores(directory, pool)
    if scores is None:
        model = load_model(config.model, device())
        scores = less_scores(config, model, pool, validation, tokenizer.pad_token_id)
        del model
    return _sft_on(config, directory, pool, select_within_budget(config, pool, scores, directory))


def rho(config: CompareConfig, directory: str) -> dict:
    """RHO-style selection, offline: the model being trained is scored once, at its starting point (the base model)."""
    directory = Path(directory)
    mixture = config.mixture
    tokenizer, pool, _ = _load_pools(config)
    reference_dir = directory / "reference"
    run_stage(sft, SFTConfig, {
        "output_dir": str(reference_dir), "seed": config.seed, "model": config.model.model_dump(),
        "data": {"sources": _dump_sources(mixture.validation), "max_length": mixture.max_length},
        "train": _budget(config) | {"steps": mixture.rho.reference_steps, "lr": mixture.rho.reference_lr,
                                    "checkpoint_every": mixture.rho.reference_steps}},
        reference_dir / "summary.json", reference_dir)
    scores = saved_scores(directory, pool)
    if scores is None:
        losses = {}
        batch = config.train.micro_batch_size
        progress = _progress(2 * -(-len(pool.examples) // batch), "RHO excess loss")
        for role, source in (("current", config.model), ("reference", config.model.model_copy(
                update={"name_or_path": str(reference_dir / "model")}))):
            model = load_model(source, device())
            losses[role] = example_losses(model, pool, batch, config.model.precision, tokenizer.pad_token_id,
                                          progress)
            del model
        progress.close()
        scores = excess_loss(losses["current"], losses["reference"])
    return _sft_on(config, directory, pool, select_within_budget(config, pool, scores, directory))


def scalebio(config: CompareConfig, directory: str) -> dict:
    directory = Path(directory)
    mixture = config.mixture
    run_dir = directory / "reweight"
    run_stage(reweight, ReweightConfig, {
        "output_dir": str(run_dir), "seed": config.seed, "model": config.model.model_dump(),
        "data": {"sources": _dump_sources(mixture.sources), "max_length": mixture.max_length},
        "validation": {"sources": _dump_sources(mixture.validation)},
        **mixture.reweight.model_dump(mode="json")}, run_dir / "weights.json", run_dir)
    weights = json.loads((run_dir / "weights.json").read_text())["weights"]
    return _mix_and_sft(config, directory, weights) | {"weights": weights}


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _progress(total: int, description: str):
    return progress_bar(DistEnv(), total, description)


MIXTURE = {"uniform": uniform, "proportional": proportional, "less": less, "rho": rho, "scalebio": scalebio}


# ------------------------------------------------------------------------------------------------------ distillation

def write_mcq_conversations(items_path: str, target: Path) -> Path:
    """MCQ items as training conversations whose prompt is exactly what the MCQ evaluation shows the model."""
    if not target.exists():
        atomic_write_text(target, "".join(json.dumps(mcq_conversation(item), ensure_ascii=False) + "\n"
                                          for item in load_items(items_path)))
    return target


def _mcq_metrics(config: CompareConfig, directory: Path, model_dir, temperature: float = 1.0) -> dict:
    overall = evaluate_mcq(directory / "eval", model_dir, config.distillation.test_items, config.distillation.n_bins,
                           temperature, config.distillation.student.precision)
    full = overall["full_vocabulary"]
    return {"accuracy": full["accuracy"], "ece": full["ece"], "brier": full["brier"], "nll": full["nll"],
            "option_accuracy": overall["options"]["accuracy"], "option_ece": overall["options"]["ece"]}


def _student_sft(config: CompareConfig, shared: dict, run_dir: Path, label_smoothing: float = 0.0) -> Path:
    distillation = config.distillation
    run_stage(sft, SFTConfig, {
        "output_dir": str(run_dir), "seed": config.seed,
        "model": {"name_or_path": shared["student_init"], "precision": distillation.student.precision,
                  "attn_implementation": distillation.student.attn_implementation,
                  "gradient_checkpointing": distillation.student.gradient_checkpointing},
        "data": {"sources": _dump_sources(distillation.train), "max_length": distillation.max_length},
        "train": _budget(config), "label_smoothing": label_smoothing}, run_dir / "summary.json", run_dir)
    return run_dir / "model"


def student_sft(config: CompareConfig, shared: dict, directory: str) -> dict:
    directory = Path(directory)
    model_dir = _student_sft(config, shared, directory / "run")
    return _mcq_metrics(config, directory, model_dir) | {"model": str(model_dir)}


def student_sft_temperature(config: CompareConfig, shared: dict, directory: str, sft_model: str) -> dict:
    """Post-hoc temperature scaling of the `sft` method's student (the driver runs `sft` first and passes its model):
    T minimises the NLL of the gold letter on the validation items. Its wall time is the fit and the evaluation."""
    directory = Path(directory)
    precision = config.distillation.student.precision
    model_config = ModelConfig(name_or_path=sft_model, precision=precision)
    encoder = ChatEncoder(load_tokenizer(model_config))
    model = load_model(model_config, device())
    items = load_items(config.distillation.validation_items)
    variants = option_variants(encoder.tokenizer, items)
    rows = list(answer_logits(model, encoder, items, config.train.micro_batch_size, precision, device()))
    logits = torch.cat([chunk_logits for _, chunk_logits in rows])
    temperature = fit_temperature(logits, [variants[i][item.gold] for i, item in enumerate(items)])
    del model
    atomic_write_json(directory / "temperature.json", {"temperature": temperature, "objective": "nll",
                                                       "fitted_on": config.distillation.validation_items})
    return _mcq_metrics(config, directory, sft_model, temperature) | {"temperature": temperature}


def student_sft_label_smoothing(config: CompareConfig, shared: dict, directory: str) -> dict:
    directory = Path(directory)
    smoothing = config.distillation.label_smoothing
    model_dir = _student_sft(config, shared, directory / "run", smoothing)
    return _mcq_metrics(config, directory, model_dir) | {"label_smoothing": smoothing}


def _distill(config: CompareConfig, shared: dict, directory: Path, loss: dict) -> dict:
    run_dir = directory / "run"
    run_stage(distill, DistillConfig, {
        "output_dir": str(run_dir), "seed": config.seed, "cache": shared["cache_train"],
        "student": config.distillation.student.model_dump(), "loss": loss, "train": _budget(config)},
        run_dir / "summary.json", run_dir)
    return _mcq_metrics(config, directory, run_dir / "model")


def topk_kd(config: CompareConfig, shared: dict, directory: str) -> dict:
    return _distill(config, shared, Path(directory), {"teacher_transform": "linear", "temperature": 1.0})


def topk_kd_other(config: CompareConfig, shared: dict, directory: str) -> dict:
    return _distill(config, shared, Path(directory), {"teacher_transform": "linear", "temperature": 1.0,
                                                      "other_bucket": True})


def online_kd(config: CompareConfig, shared: dict, directory: str) -> dict:
    return _distill(config, shared, Path(directory), {"mode": "online"})


def first(config: CompareConfig, shared: dict, directory: str) -> dict:
    directory = Path(directory)
    settings = config.distillation.calibrate.model_dump(mode="json") | {
        "output_dir": str(directory / "calibrate"), "cache": shared["cache_validation"]}
    calibration = directory / "calibrate" / "calibration.json"
    run_stage(calibrate, CalibrateConfig, settings, calibration)
    transform = config.distillation.calibrate.transform
    result = _distill(config, shared, directory, {"teacher_transform": transform, "calibration": str(calibration)})
    return result | {"temperature": json.loads(calibration.read_text())["temperature"], "transform": transform}


DISTILLATION = {"sft": student_sft, "sft_temperature": student_sft_temperature,
                "sft_label_smoothing": student_sft_label_smoothing, "topk_kd": topk_kd, "topk_kd_other": topk_kd_other,
                "online_kd": online_kd, "first": first}
