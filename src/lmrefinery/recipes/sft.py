"""`lmrefinery sft`: supervised fine-tuning on one or several sources with a chosen sampling.

setup (config, data, model — all validated before the run directory is touched) → train (token-mean loss over the
global batch, checkpoints, optional validation) → save (HF model + tokenizer, summary.json).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from lmrefinery.config import SFTConfig
from lmrefinery.errors import UserError
from lmrefinery.data.collate import collate, rank_micro_batches
from lmrefinery.data.sampling import MixtureSampler
from lmrefinery.evaluation.loss import evaluate_loss
from lmrefinery.fileio import atomic_write_json
from lmrefinery.lisa import LISA
from lmrefinery.models import load_model
from lmrefinery.recipes.common import accumulation_steps, load_data, source_counts, total_steps
from lmrefinery.train.checkpoint import (latest_checkpoint, load_checkpoint, read_checkpoint_state,
                                        save_checkpoint, seed_everything)
from lmrefinery.train.distributed import setup_distributed, shard_model
from lmrefinery.train.losses import optimizer_step
from lmrefinery.train.optim import build_adamw, build_scheduler
from lmrefinery.train.precision import peak_memory_bytes
from lmrefinery.train.run_dir import MetricsLog, check_output_dir, start_run
from lmrefinery.train.save import save_hf_model

log = logging.getLogger(__name__)


def run(config: SFTConfig, resume: bool = False) -> Path:
    env = setup_distributed()
    output_dir = check_output_dir(config.output_dir, resume)
    seed_everything(config.seed, env.rank)
    train = config.train

    tokenizer, pool, extras = load_data(config.model, config.data,
                                        {"validation": config.validation.sources if config.validation else []})
    validation_pool = extras.get("validation")
    accumulation = accumulation_steps(train.batch_size, train.micro_batch_size, env.world_size)
    steps = total_steps(train.steps, train.epochs, pool, train.batch_size)
    sampler = MixtureSampler.build(config.sampling, pool.names, pool.source_indices(), train.batch_size, config.seed)

    model = shard_model(load_model(config.model, env.device), env)
    model.train()
    optimizer = build_adamw(model, train)
    scheduler = build_scheduler(optimizer, train, steps)
    lisa = None
    if config.lisa.enabled:
        settings = config.lisa.model_dump(exclude={"enabled"})
        try:
            lisa = LISA(model, optimizer, seed=config.seed, **settings)
        except ValueError as exc:
            raise UserError(f"lisa: {exc}") from None

    start_run(output_dir, config, env.is_main)
    start_step = 0
    checkpoint = latest_checkpoint(output_dir, env) if resume else None
    if checkpoint is not None:
        if lisa is not None:
            lisa.load_state_dict(read_checkpoint_state(checkpoint)["lisa"])
        state = load_checkpoint(checkpoint, env, {"model": model}, {"model": (model, optimizer)})
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        start_step = state["step"]
        log.info("resuming from %s", checkpoint)
    metrics = MetricsLog(output_dir / "metrics.jsonl", env.is_main, resume_step=start_step if resume else None)
    if start_step == 0:
        metrics.write(step=0, event="start", sources=pool.names, source_sizes=pool.sizes,
                      accumulation=accumulation, world_size=env.world_size, total_steps=steps,
                      data_stats=[vars(s) for s in pool.stats])

    def checkpoint_now(step: int) -> None:
        save_checkpoint(output_dir, step, env, {"model": model}, {"model": (model, optimizer)},
                        {"scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(),
                         "lisa": lisa.state_dict() if lisa is not None else None}, train.keep_last)

    def validate(step: int) -> None:
        result = evaluate_loss(model, validation_pool, env, config.validation.batch_size, config.model.precision,
                               tokenizer.pad_token_id)
        metrics.write(step=step, event="validation", val_loss=result["overall"]["loss"],
                      val_per_source={k: v["loss"] for k, v in result["per_source"].items()})
        log.info("step %d validation loss %.4f", step, result["overall"]["loss"])

    progress = tqdm(total=steps, initial=start_step, desc="sft", disable=not env.is_main, dynamic_ncols=True)
    last_loss = None
    for step in range(start_step, steps):
        global_batch = sampler.next_batch()
        micro_batches = [collate([pool.examples[i] for i in indices], tokenizer.pad_token_id).to(env.device)
                         for indices in rank_micro_batches(global_batch, env.rank, env.world_size,
                                                           train.micro_batch_size)]
        lr = scheduler.get_last_lr()[0]
        started = time.perf_counter()
        result = optimizer_step(model, optimizer, scheduler, micro_batches, env, config.model.precision,
                                train.max_grad_norm, step + 1)
        elapsed = time.perf_counter() - started
        last_loss = result.loss
        done = step + 1
        if lisa is not None:
            if lisa.steps_taken % lisa.interval == 0:  # first step of a period: its optimizer state now exists
                metrics.write(step=done, event="lisa", **lisa.summary())
            lisa.step()
        if done % train.log_every == 0 or done == steps:
            metrics.write(step=done, loss=result.loss, lr=lr, grad_norm=result.grad_norm,
                          supervised_tokens=result.supervised_tokens,
                          tokens_per_s=result.input_tokens / elapsed, step_time_s=elapsed,
                          peak_memory_bytes=peak_memory_bytes(env.device),
                          source_counts=source_counts(pool, global_batch))
        progress.update(1)
        progress.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}")
        if validation_pool is not None and (done % config.validation.every == 0 or done == steps):
            validate(done)
        if (train.checkpoint_every and done % train.checkpoint_every == 0) or done == steps:
            checkpoint_now(done)
    progress.close()

    model_dir = output_dir / "model"
    if config.save_model:
        save_hf_model(model, tokenizer, model_dir, env)
    if env.is_main:
        atomic_write_json(output_dir / "summary.json", {
            "command": "sft", "steps": steps, "final_loss": last_loss, "sources": pool.names,
            "source_sizes": pool.sizes, "sampling": config.sampling.model_dump(mode="json"),
            "model": str(model_dir) if config.save_model else None})
        log.info("outputs in %s (model: %s, metrics: %s)", output_dir, model_dir, output_dir / "metrics.jsonl")
    return output_dir
