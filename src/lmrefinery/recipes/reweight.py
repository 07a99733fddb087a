"""`lmrefinery reweight`: learn per-source data weights with ScaleBiO on an LLM.

setup (data, two model copies u and w, optional LISA on each, the ScaleBiO core) → steps (one training batch drawn
uniformly from the pooled sources + one validation batch) → outputs (weights.json, weights.csv, plots, report.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lmrefinery.config import ReweightConfig, SamplingConfig
from lmrefinery.data.collate import collate, rank_micro_batches
from lmrefinery.data.sampling import MixtureSampler
from lmrefinery.errors import TrainingDiverged, UserError
from lmrefinery.lisa import LISA
from lmrefinery.models import load_model
from lmrefinery.recipes.common import accumulation_steps, load_data, source_counts, total_steps
from lmrefinery.recipes.reweight_report import write_outputs
from lmrefinery.scalebio import ScaleBiO
from lmrefinery.train.checkpoint import (latest_checkpoint, load_checkpoint, read_checkpoint_state,
                                        save_checkpoint, seed_everything)
from lmrefinery.train.distributed import all_reduce_sum, progress_bar, setup_distributed, shard_model
from lmrefinery.train.losses import example_loss_sums
from lmrefinery.train.precision import peak_memory_bytes
from lmrefinery.train.run_dir import MetricsLog, check_output_dir, start_run
from lmrefinery.train.save import save_hf_model

log = logging.getLogger(__name__)
POOLED = SamplingConfig(strategy="proportional")  # uniform over the pooled examples, as the method prescribes


def run(config: ReweightConfig, resume: bool = False) -> Path:
    env = setup_distributed()
    output_dir = check_output_dir(config.output_dir, resume)
    seed_everything(config.seed, env.rank)
    train, precision = config.train, config.model.precision

    tokenizer, pool, extras = load_data(config.model, config.data, {"validation": config.validation.sources})
    validation = extras["validation"]
    accumulation_steps(train.batch_size, train.micro_batch_size, env.world_size)
    accumulation_steps(train.val_batch_size, train.micro_batch_size, env.world_size, "train.val_batch_size")
    steps = total_steps(train.steps, train.epochs, pool, train.batch_size)
    train_sampler = MixtureSampler.build(POOLED, pool.names, pool.source_indices(), train.batch_size, config.seed)
    val_sampler = MixtureSampler.build(POOLED, validation.names, validation.source_indices(), train.val_batch_size,
                                       config.seed + 1)

    upper = shard_model(load_model(config.model, env.device), env)
    lower = shard_model(load_model(config.model, env.device), env)
    upper.train()
    lower.train()

    def train_loss_fn(model, batch):
        sums, tokens = example_loss_sums(model, batch, precision)
        return sums / tokens.clamp(min=1), batch.source_ids

    def val_loss_fn(model, batch):
        sums, tokens = example_loss_sums(model, batch, precision)
        return sums.sum() / tokens.sum().clamp(min=1)

    hyper = config.scalebio
    core = ScaleBiO(upper, len(pool.names), train_loss_fn, val_loss_fn, lower_model=lower, alpha=hyper.alpha,
                    tau=hyper.tau, rounds=hyper.rounds, lr_lower=hyper.lr_lower, lr_upper=hyper.lr_upper,
                    lr_weights=hyper.lr_weights, optimizer=hyper.optimizer, weight_decay=hyper.weight_decay,
                    total_steps=steps, schedule=train.schedule, warmup_ratio=train.warmup_ratio,
                    max_grad_norm=hyper.max_grad_norm, max_weight_grad_norm=hyper.max_weight_grad_norm,
                    source_ids_fn=lambda batch: batch.source_ids, val_weight_fn=lambda batch: batch.supervised_tokens,
                    all_reduce=lambda tensor: all_reduce_sum(tensor, env), gradient_sum_factor=env.world_size)
    lisas = {}
    if config.lisa.enabled:
        settings = config.lisa.model_dump(exclude={"enabled"})
        try:  # u and w draw their layers independently
            lisas = {"lower": LISA(lower, core.lower_optimizer, seed=2 * config.seed + 1, **settings),
                     "upper": LISA(upper, core.upper_optimizer, seed=2 * config.seed + 2, **settings)}
        except ValueError as exc:
            raise UserError(f"lisa: {exc}") from None

    modules = {"lower": lower, "upper": upper}
    optimizers = {"lower": (lower, core.lower_optimizer), "upper": (upper, core.upper_optimizer)}
    start_run(output_dir, config, env.is_main)
    start_step = 0
    checkpoint = latest_checkpoint(output_dir, env) if resume else None
    if checkpoint is not None:
        saved = read_checkpoint_state(checkpoint)
        for name, lisa in lisas.items():
            lisa.load_state_dict(saved["lisa"][name])
        state = load_checkpoint(checkpoint, env, modules, optimizers)
        core.load_state_dict(state["objects"]["scalebio"])
        train_sampler.load_state_dict(state["train_sampler"])
        val_sampler.load_state_dict(state["val_sampler"])
        start_step = state["step"]
        log.info("resuming from %s", checkpoint)
    metrics = MetricsLog(output_dir / "metrics.jsonl", env.is_main, resume_step=start_step if resume else None)
    if start_step == 0:
        metrics.write(step=0, event="start", sources=pool.names, source_sizes=pool.sizes,
                      validation_sources=validation.names, validation_size=len(validation.examples),
                      world_size=env.world_size, total_steps=steps, weights=core.weights.tolist(),
                      data_stats=[vars(s) for s in pool.stats])

    def micro_batches(sampler, examples_pool):
        indices = sampler.next_batch()
        batches = [collate([examples_pool.examples[i] for i in share], tokenizer.pad_token_id).to(env.device)
                   for share in rank_micro_batches(indices, env.rank, env.world_size, train.micro_batch_size)]
        return indices, batches

    def checkpoint_now(step: int) -> None:
        save_checkpoint(output_dir, step, env, modules, optimizers,
                        {"train_sampler": train_sampler.state_dict(), "val_sampler": val_sampler.state_dict(),
                         "lisa": {name: lisa.state_dict() for name, lisa in lisas.items()}},
                        train.keep_last, objects={"scalebio": core.state_dict(include_models=False)})

    short = [name[:10] for name in pool.names]
    progress = progress_bar(env, steps, "reweight", start_step)
    for step in range(start_step, steps):
        train_indices, train_batches = micro_batches(train_sampler, pool)
        _, val_batches = micro_batches(val_sampler, validation)
        started = time.perf_counter()
        try:
            result = core.step(train_batches, val_batches)
        except FloatingPointError as exc:
            raise TrainingDiverged(str(exc)) from None
        elapsed = time.perf_counter() - started
        done = step + 1
        for name, lisa in lisas.items():
            if lisa.steps_taken % lisa.interval == 0:
                metrics.write(step=done, event=f"lisa_{name}", **lisa.summary())
            lisa.step()
        weights = core.weights.tolist()
        if done % train.log_every == 0 or done == steps:
            metrics.write(step=done, weights=dict(zip(pool.names, weights)), **result, step_time_s=elapsed,
                          peak_memory_bytes=peak_memory_bytes(env.device),
                          source_counts=source_counts(pool, train_indices))
        progress.update(1)
        progress.set_postfix_str(" ".join(f"{n}={w:.3f}" for n, w in zip(short, weights)))
        if (train.checkpoint_every and done % train.checkpoint_every == 0) or done == steps:
            checkpoint_now(done)
    progress.close()

    if config.save_upper_model:
        save_hf_model(upper, tokenizer, output_dir / "upper_model", env)
    if env.is_main:
        write_outputs(output_dir, config, pool, core, steps)
        log.info("weights: %s", {n: round(w, 4) for n, w in zip(pool.names, core.weights.tolist())})
        log.info("outputs in %s (weights.json, weights.csv, plots/, report.md)", output_dir)
    return output_dir
