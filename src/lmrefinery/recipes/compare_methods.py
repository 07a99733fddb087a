"""One function per method of `lmrefinery compare`. Each runs in its own process: it takes the validated config and its
directory, runs its stages (each skipped when complete) and returns its measured numbers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from lmrefinery.compare_config import CompareConfig
from lmrefinery.config import CalibrateConfig, DataConfig, DistillConfig, MixConfig, ReweightConfig, SFTConfig
from lmrefinery.evaluation.mcq import answer_logits, fit_temperature, load_items, option_variants
from lmrefinery.errors import UserError
from lmrefinery.fileio import atomic_write_json, atomic_write_text
from lmrefinery.recipes.stages import evaluate_answers, evaluate_mcq, run_stage


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


def fill_budget(lengths: list[int], budget: int, batch_size: int) -> int:
    """How many of the ordered candidates make the SFT set: the longest prefix within `budget` tokens, cut to whole
    batches so that one pass of the SFT run sees each chosen example exactly once."""
    total = count = 0
    for length in lengths:
        if total + length > budget:
            break
        total += length
        count += 1
    count -= count % batch_size
    if count == 0:
        raise UserError(f"mixture: a token budget of {budget} does not fit one batch of {batch_size} examples; "
                        "raise mixture.token_budget (or mixture.num_examples)")
    return count


# ----------------------------------------------------------------------------------------------- mixture / selection

def _sft_on(config: CompareConfig, directory: Path, examples: list[dict], extra: dict | None = None) -> dict:
    """The shared budget: one pass of SFT of the base model over the method's set, then the target's test metrics."""
    from lmrefinery.recipes import sft

    mixture = config.mixture
    data_path = directory / "selected.jsonl"
    atomic_write_text(data_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in examples))
    steps = len(examples) // config.train.batch_size
    run_dir = directory / "sft"
    run_stage(sft, SFTConfig, {
        "output_dir": str(run_dir), "seed": config.seed, "model": config.model.model_dump(),
        "data": {"sources": [{"name": "selected", "path": str(data_path)}], "max_length": mixture.max_length},
        "train": _budget(config) | {"steps": steps, "checkpoint_every": steps}}, run_dir / "summary.json", run_dir)
    metrics = evaluate_answers(directory / "eval", run_dir / "model", _dump_sources(mixture.test),
                               mixture.max_length, mixture.exact_match, mixture.max_new_tokens)
    counts: dict[str, int] = {s.name: 0 for s in mixture.sources}
    for record in examples:
        counts[record["source"]] += 1
    return metrics | {"sft_examples": len(examples), "sft_steps": steps, "examples_per_source": counts} | (extra or {})


def _pool_records(config: CompareConfig, pool) -> list[dict]:
    """Each pool example's record as a conversation tagged with its source (the form `mix` writes and SFT reads)."""
    from lmrefinery.recipes.mix import source_conversations

    conversations = {s.name: source_conversations(s, "error") for s in config.mixture.sources}
    return [{**conversations[pool.names[e.source_id]][e.record], "source": pool.names[e.source_id]}
            for e in pool.examples]


def _record_key(record: dict) -> str:
    return json.dumps(record, sort_keys=True)


def _mix_and_sft(config: CompareConfig, directory: Path, weights) -> dict:
    """Draw a weighted mixture larger than needed, keep each example's first draw (a larger draw falls back to
    drawing with replacement sooner), and keep the budget prefix. The draw doubles until the unique examples hold
    the budget or the pool is exhausted."""
    from lmrefinery.recipes import mix

    pool = _load_pools(config)[1]
    budget = token_budget(config, pool)
    # token counts come from the pool, tokenised exactly as SFT will see the records
    length_of = {_record_key(r): len(e.input_ids) for r, e in zip(_pool_records(config, pool), pool.examples)}
    draw = 2 * _sft_examples(config)
    while True:
        mix_dir = directory / "mix"
        mix.run(MixConfig(output_dir=str(mix_dir), sources=config.mixture.sources, weights=weights,
                          num_examples=draw, seed=config.seed))
        drawn = [json.loads(line) for line in (mix_dir / "mix.jsonl").read_text().splitlines()]
        first_draws: dict[str, dict] = {}
        for record in drawn:
            first_draws.setdefault(_record_key(record), record)
        records = list(first_draws.values())
        lengths = [length_of[_record_key(r)] for r in records]
        if sum(lengths) > budget or draw > 8 * len(pool.examples):
            break
        draw *= 2
    chosen = records[: fill_budget(lengths, budget, config.train.batch_size)]
    return _sft_on(config, directory, chosen, {"token_budget": budget, "sft_tokens": sum(lengths[: len(chosen)])})


def uniform(config: CompareConfig, directory: str) -> dict:
    return _mix_and_sft(config, Path(directory), {s.name: 1.0 for s in config.mixture.sources})


def proportional(config: CompareConfig, directory: str) -> dict:
    from lmrefinery.recipes.mix import source_conversations

    sizes = {s.name: float(len(source_conversations(s, "error"))) for s in config.mixture.sources}
    return _mix_and_sft(config, Path(directory), sizes)


def _load_pools(config: CompareConfig):
    from lmrefinery.recipes.common import load_data

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


def select_within_budget(config: CompareConfig, pool, scores: torch.Tensor, directory: Path) -> tuple[list, dict]:
    """The highest-scoring examples that fit the token budget (whole batches); writes every example's score."""
    budget = token_budget(config, pool)
    order = torch.argsort(-scores.double(), stable=True).tolist()  # ties: the lower index first
    count = fill_budget([len(pool.examples[i].input_ids) for i in order], budget, config.train.batch_size)
    chosen = order[:count]
    selected = set(chosen)
    rows = [{"source": pool.names[e.source_id], "record": e.record, "score": float(scores[i]),
             "selected": i in selected} for i, e in enumerate(pool.examples)]
    pool_records = _pool_records(config, pool)
    records = [pool_records[i] for i in chosen]
    random.Random(config.seed).shuffle(records)
    atomic_write_text(directory / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return records, {"token_budget": budget, "sft_tokens": sum(len(pool.examples[i].input_ids) for i in chosen)}


def less_scores(config: CompareConfig, model, pool, validation, pad_id: int) -> torch.Tensor:
    from lmrefinery.selection import CountSketch, cosine_to_mean, gradient_features, last_block_parameters

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
    from lmrefinery.models import load_model

    directory = Path(directory)
    tokenizer, pool, validation = _load_pools(config)
    scores = saved_scores(directory, pool)
    if scores is None:
        model = load_model(config.model, device())
        scores = less_scores(config, model, pool, validation, tokenizer.pad_token_id)
        del model
    records, budget = select_within_budget(config, pool, scores, directory)
    return _sft_on(config, directory, records, budget)


def rho(config: CompareConfig, directory: str) -> dict:
    """RHO-style selection, offline: the model being trained is scored once, at its starting point (the base model)."""
    from lmrefinery.models import load_model
    from lmrefinery.recipes import sft
    from lmrefinery.selection import example_losses

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
        progress = _progress(2 * -(-len(pool.examples) // 8), "RHO excess loss")
        for role, source in (("current", config.model), ("reference", config.model.model_copy(
                update={"name_or_path": str(reference_dir / "model")}))):
            model = load_model(source, device())
            losses[role] = example_losses(model, pool, 8, config.model.precision, tokenizer.pad_token_id, progress)
            del model
        progress.close()
        scores = losses["current"] - losses["reference"]
    records, budget = select_within_budget(config, pool, scores, directory)
    return _sft_on(config, directory, records, budget)


def scalebio(config: CompareConfig, directory: str) -> dict:
    from lmrefinery.recipes import reweight

    directory = Path(directory)
    mixture = config.mixture
    run_dir = directory / "reweight"
    run_stage(reweight, ReweightConfig, {
        "output_dir": str(run_dir), "seed": config.seed, "model": config.model.model_dump(),
        "data": {"sources": _dump_sources(mixture.sources), "max_length": mixture.max_length},
        "validation": {"sources": _dump_sources(mixture.validation)},
        **mixture.reweight.model_dump(mode="json")}, run_dir / "weights.json", run_dir)
    weights = json.loads((run_dir / "weights.json").read_text())["weights"]
    return _mix_and_sft(config, directory, str(run_dir / "weights.json")) | {"weights": weights}


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _progress(total: int, description: str):
    from lmrefinery.train.distributed import DistEnv, progress_bar

    return progress_bar(DistEnv(), total, description)


MIXTURE = {"uniform": uniform, "proportional": proportional, "less": less, "rho": rho, "scalebio": scalebio}


# ------------------------------------------------------------------------------------------------------ distillation

def write_mcq_conversations(items_path: str, target: Path) -> Path:
    """MCQ items as training conversations whose prompt is exactly what the MCQ evaluation shows the model."""
    if not target.exists():
        items = load_items(items_path)
        atomic_write_text(target, "".join(json.dumps({"messages": [
            {"role": "user", "content": item.prompt},
            {"role": "assistant", "content": item.letters[item.gold]}]}, ensure_ascii=False) + "\n" for item in items))
    return target


def _mcq_metrics(config: CompareConfig, directory: Path, model_dir, temperature: float = 1.0) -> dict:
    overall = evaluate_mcq(directory / "eval", model_dir, config.distillation.test_items, config.distillation.n_bins,
                           temperature)
    full = overall["full_vocabulary"]
    return {"accuracy": full["accuracy"], "ece": full["ece"], "brier": full["brier"], "nll": full["nll"],
            "option_accuracy": overall["options"]["accuracy"], "option_ece": overall["options"]["ece"]}


def _student_sft(config: CompareConfig, shared: dict, run_dir: Path, label_smoothing: float = 0.0) -> Path:
    from lmrefinery.recipes import sft

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
    return _mcq_metrics(config, directory, _student_sft(config, shared, directory / "run"))


def student_sft_temperature(config: CompareConfig, shared: dict, directory: str) -> dict:
    """Post-hoc temperature scaling of the SFT student: T minimises the NLL of the gold letter on the validation
    items. Reuses the `sft` method's model when it has been trained (then the wall time is the fit and evaluation)."""
    from lmrefinery.config import ModelConfig
    from lmrefinery.models import load_model, load_tokenizer

    directory = Path(directory)
    sibling = directory.parent / "sft" / "run"
    reused = (sibling / "summary.json").exists()
    model_dir = sibling / "model" if reused else _student_sft(config, shared, directory / "run")
    model_config = ModelConfig(name_or_path=str(model_dir))
    tokenizer, model = load_tokenizer(model_config), load_model(model_config, device())
    items = load_items(config.distillation.validation_items)
    variants = option_variants(tokenizer, items)
    rows = list(answer_logits(model, tokenizer, items, 8, "fp32", device()))
    logits = torch.cat([chunk_logits for _, chunk_logits in rows])
    temperature = fit_temperature(logits, [variants[i][item.gold] for i, item in enumerate(items)])
    del model
    atomic_write_json(directory / "temperature.json", {"temperature": temperature, "objective": "nll",
                                                       "fitted_on": config.distillation.validation_items})
    return _mcq_metrics(config, directory, model_dir, temperature) | {"temperature": temperature,
                                                                      "reuses_sft_model": reused}


def student_sft_label_smoothing(config: CompareConfig, shared: dict, directory: str) -> dict:
    directory = Path(directory)
    smoothing = config.distillation.label_smoothing
    model_dir = _student_sft(config, shared, directory / "run", smoothing)
    return _mcq_metrics(config, directory, model_dir) | {"label_smoothing": smoothing}


def _distill(config: CompareConfig, shared: dict, directory: Path, loss: dict) -> dict:
    from lmrefinery.recipes import distill

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
    from lmrefinery.recipes import calibrate

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
