"""Setup steps the recipes share: tokenizer + data validated before anything is written, batch geometry, LISA, and
the supervised run that sft and distill both make."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from lmrefinery.config import (DataConfig, LISAConfig, LoRAConfig, ModelConfig, SamplingConfig, SourceConfig,
                               TrainConfig, validate_config)
from lmrefinery.data.sampling import MixtureSampler
from lmrefinery.data.sources import SourcePool, load_pool
from lmrefinery.data.tokenize import ChatEncoder
from lmrefinery.distill.cache import MANIFEST, TeacherCache
from lmrefinery.errors import UserError
from lmrefinery.evaluation.loss import evaluate_loss
from lmrefinery.fileio import atomic_write_json
from lmrefinery.lisa import LISA
from lmrefinery.models import load_tokenizer
from lmrefinery.models.lora import add_lora
from lmrefinery.plots import loss_plot
from lmrefinery.train.checkpoint_load import load_module_weights
from lmrefinery.train.rng import seed_everything
from lmrefinery.train.distributed import DistEnv, setup_distributed, shard_model
from lmrefinery.train.loop import Loop, run_loop
from lmrefinery.train.losses import LossSumsFn, example_loss_sums
from lmrefinery.train.optim import build_adamw, build_scheduler
from lmrefinery.train.precision import resolve_precision
from lmrefinery.train.run_dir import check_output_dir, read_metrics
from lmrefinery.train.save import save_hf_model, save_lora
from lmrefinery.train.supervised import supervised_step_fn
from lmrefinery.train.tracking import Trackers

log = logging.getLogger(__name__)


def begin_training_run(config, resume: bool) -> tuple[DistEnv, Path]:
    """Process group, a run directory that may be used (a new one, or an old one with --resume), seeded RNGs."""
    env = setup_distributed()
    output_dir = check_output_dir(config.output_dir, resume)
    seed_everything(config.seed, env.rank)
    return env, output_dir


def load_data(model: ModelConfig, data: DataConfig, extra: dict[str, list[SourceConfig]] | None = None):
    """Tokenizer, encoder and the training pool (+ named extra pools such as validation), all validated."""
    tokenizer = load_tokenizer(model)
    encoder = ChatEncoder(tokenizer, data.system_prompt)
    pool = load_pool(data.sources, encoder, data)
    extras = {name: load_pool(sources, encoder, data) for name, sources in (extra or {}).items() if sources}
    return tokenizer, pool, extras


def load_cache_with_data(cache_dir: str):
    """A teacher cache, the teacher's tokenizer and the very examples the cache was computed on (re-tokenised from
    the data and model configs in its manifest, checked against its fingerprints)."""
    cache = TeacherCache(cache_dir)
    data = validate_config(DataConfig, cache.manifest["data"], f"{cache_dir}/{MANIFEST} data")
    model = validate_config(ModelConfig, cache.manifest["model"], f"{cache_dir}/{MANIFEST} model")
    tokenizer, pool, _ = load_data(model, data)
    cache.check_compatible(tokenizer, pool.examples)
    return cache, tokenizer, pool, data


def accumulation_steps(batch_size: int, micro_batch_size: int, world_size: int, key: str = "train.batch_size") -> int:
    per_pass = micro_batch_size * world_size
    if batch_size % per_pass:
        raise UserError(f"{key}={batch_size} must be a multiple of train.micro_batch_size × processes "
                        f"= {micro_batch_size} × {world_size}")
    return batch_size // per_pass


def total_steps(steps: int | None, epochs: float | None, pool: SourcePool, batch_size: int) -> int:
    if steps is not None:
        return steps
    return max(1, math.ceil((epochs or 1.0) * len(pool.examples) / batch_size))


def open_trackers(config, output_dir: Path, env: DistEnv) -> Trackers:
    """TensorBoard / W&B for `config.report_to`, on rank 0 (the other ranks get inert ones)."""
    return Trackers(list(config.report_to), output_dir, output_dir.name,
                    config.model_dump(mode="json"), env.is_main)


def close_trackers(trackers: Trackers, output_dir: Path) -> None:
    trackers.images(output_dir / "plots")
    trackers.close()


def make_lisa(model, optimizer, settings: LISAConfig, seed: int) -> LISA:
    try:
        return LISA(model, optimizer, seed=seed, **settings.model_dump(exclude={"enabled"}))
    except ValueError as exc:
        raise UserError(f"lisa: {exc}") from None


def validation_fn(model, pool: SourcePool, env: DistEnv, batch_size: int, precision: str, pad_id: int,
                  pack_rows: bool = False):
    """step → the held-out loss, overall and per source (the loop logs it as a 'validation' event)."""
    def validate(step: int) -> dict:
        result = evaluate_loss(model, pool, env, batch_size, precision, pad_id, pack_rows=pack_rows)
        return {"val_loss": result["overall"]["loss"],
                "val_per_source": {name: value["loss"] for name, value in result["per_source"].items()}}
    return validate


def trainable_model(model, lora: LoRAConfig, env: DistEnv, seed: int, adapters: tuple[str, ...] = ("default",)):
    """The model a training command trains: with LoRA adapters (`adapters`, initialised from `seed`) on the frozen
    base when `lora.enabled`, sharded over the processes (FSDP2), in train mode."""
    if lora.enabled:
        model = add_lora(model, lora, adapters, seed)
    model = shard_model(model, env)
    model.train()
    return model


def save_trained(model, tokenizer, output_dir: Path, env: DistEnv, lora: LoRAConfig) -> Path:
    """The final model: in HF format to output_dir/model, or (LoRA) the adapter to output_dir/adapter and, with
    `lora.merge`, base + adapter merged to output_dir/model. Returns the directory later commands load."""
    if not lora.enabled:
        save_hf_model(model, tokenizer, output_dir / "model", env)
        return output_dir / "model"
    save_lora(model, tokenizer, output_dir / "adapter", env,
              merged_directory=output_dir / "model" if lora.merge else None)
    return output_dir / "model" if lora.merge else output_dir / "adapter"


def train_supervised(*, name: str, config, output_dir: Path, env: DistEnv, model, tokenizer, pool: SourcePool,
                     sampling: SamplingConfig, train: TrainConfig, precision: str, lisa: LISAConfig, seed: int,
                     save_model: bool, validation_pool: SourcePool | None = None, validation=None,
                     loss_sums_fn: LossSumsFn = example_loss_sums, normalize_by: str = "tokens",
                     start_metrics: dict | None = None, summary: dict | None = None, diagnostics: tuple[str, ...] = (),
                     resume: bool = False) -> dict:
    """The supervised run of sft and distill: batches drawn by `sampling`, AdamW + schedule (+ LISA) around the
    shared loop, then the model in HF format (output_dir/model) and summary.json (returned). Each name in
    `diagnostics` (a per-step metric of the loss function) is summarised as its mean over the last quarter of the
    logged steps."""
    accumulation = accumulation_steps(train.batch_size, train.micro_batch_size, env.world_size)
    steps = total_steps(train.steps, train.epochs, pool, train.batch_size)
    sampler = MixtureSampler.build(sampling, pool.names, pool.source_indices(), train.batch_size, seed)
    lora = config.lora
    optimizer = build_adamw(model, train, trainable_only=lora.enabled)
    scheduler = build_scheduler(optimizer, train, steps)
    layer_samplers = {"model": make_lisa(model, optimizer, lisa, seed)} if lisa.enabled else {}
    trackers = open_trackers(config, output_dir, env)
    loop = Loop(
        name=name, config=config, output_dir=output_dir, env=env, steps=steps, schedule=train,
        modules={"model": model}, optimizers={"model": (model, optimizer)},
        stateful={"scheduler": scheduler, "sampler": sampler}, layer_samplers=layer_samplers,
        start_record={"sources": pool.names, "source_sizes": pool.sizes, "data_stats": [vars(s) for s in pool.stats],
                      "accumulation": accumulation, "precision": resolve_precision(precision, env.device),
                      **(start_metrics or {})},
        validate=(validation_fn(model, validation_pool, env, validation.batch_size, precision, tokenizer.pad_token_id,
                                train.packing) if validation_pool is not None else None),
        validate_every=validation.every if validation is not None else None, trackers=trackers)
    step_fn = supervised_step_fn(model, optimizer, scheduler, sampler, pool, env,
                                 micro_batch_size=train.micro_batch_size, precision=precision,
                                 max_grad_norm=train.max_grad_norm, pad_id=tokenizer.pad_token_id,
                                 loss_sums_fn=loss_sums_fn, normalize_by=normalize_by, pack_rows=train.packing)
    run_loop(loop, step_fn, resume)

    best = loop.best
    if train.keep_best and best.get("step") not in (None, steps):  # the best-validation weights become the model
        load_module_weights(output_dir / "checkpoints" / f"step-{best['step']}", {"model": model})
    model_dir = save_trained(model, tokenizer, output_dir, env, lora) if save_model else output_dir / "model"
    result = {"command": name, "steps": steps, "sources": pool.names, "source_sizes": pool.sizes, **(summary or {}),
              "model": str(model_dir) if save_model else None,
              "model_step": best["step"] if train.keep_best and best.get("step") else steps}
    if env.is_main:
        result |= summarise_metrics(output_dir, diagnostics, name)
        atomic_write_json(output_dir / "summary.json", result)
        log.info("outputs in %s (model: %s, metrics: %s, plots/loss.png)", output_dir, model_dir,
                 output_dir / "metrics.jsonl")
    close_trackers(trackers, output_dir)
    return result


FAR_ABOVE_BEST = 1.1


def summarise_metrics(output_dir: Path, diagnostics: tuple[str, ...], name: str) -> dict:
    """From metrics.jsonl (complete however often the run was resumed): the last training loss, the last and best
    validation loss, each diagnostic's mean over the last quarter of the steps; plots/loss.png; a warning when the
    validation loss ended well above its best."""
    records = read_metrics(output_dir / "metrics.jsonl")
    rows = [m for m in records if "loss" in m and "event" not in m]
    validation = [m for m in records if m.get("event") == "validation"]
    summary = {"final_loss": rows[-1]["loss"] if rows else None}
    tail = rows[-max(1, len(rows) // 4):]
    summary |= {f"final_{key}": sum(m[key] for m in tail) / len(tail) for key in diagnostics
                if tail and all(key in m for m in tail)}
    if validation:
        best = min(validation, key=lambda m: m["val_loss"])
        summary |= {"last_val_loss": validation[-1]["val_loss"], "best_val_loss": best["val_loss"],
                    "best_val_step": best["step"]}
        if validation[-1]["val_loss"] > FAR_ABOVE_BEST * best["val_loss"]:
            log.warning("validation loss ended at %.4f, %.0f%% above its best %.4f at step %d%s", validation[-1][
                "val_loss"], 100 * (validation[-1]["val_loss"] / best["val_loss"] - 1), best["val_loss"], best["step"],
                "" if validation[-1]["step"] == best["step"] else
                "; train.keep_best=true keeps the best checkpoint's weights as the model")
    loss_plot(output_dir / "plots" / "loss.png", ([m["step"] for m in rows], [m["loss"] for m in rows]),
              ([m["step"] for m in validation], [m["val_loss"] for m in validation]), f"{name}: loss")
    return summary
