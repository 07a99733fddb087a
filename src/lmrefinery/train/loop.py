"""The supervised training loop shared by `sft` and `distill`: sampling → micro-batches → optimizer step, with LISA,
validation, metrics, checkpoints and resume. Recipes set up the model, data and loss, then call `train`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from lmrefinery.config import LISAConfig, TrainConfig, ValidationConfig
from lmrefinery.data.collate import collate, rank_micro_batches
from lmrefinery.data.sampling import MixtureSampler
from lmrefinery.data.sources import SourcePool
from lmrefinery.errors import UserError
from lmrefinery.evaluation.loss import evaluate_loss
from lmrefinery.lisa import LISA
from lmrefinery.recipes.common import source_counts
from lmrefinery.train.checkpoint import (latest_checkpoint, load_checkpoint, read_checkpoint_state,
                                        save_checkpoint)
from lmrefinery.train.distributed import DistEnv, progress_bar
from lmrefinery.train.losses import LossSumsFn, example_loss_sums, optimizer_step
from lmrefinery.train.optim import build_adamw, build_scheduler
from lmrefinery.train.precision import peak_memory_bytes
from lmrefinery.train.run_dir import MetricsLog, start_run

log = logging.getLogger(__name__)


@dataclass
class TrainingSetup:
    name: str                      # progress-bar label
    config: BaseModel              # written to config.yaml
    output_dir: Path
    env: DistEnv
    model: object                  # sharded, in train mode
    pad_id: int
    pool: SourcePool
    sampler: MixtureSampler
    steps: int
    train: TrainConfig
    precision: str
    lisa: LISAConfig
    seed: int
    validation_pool: SourcePool | None = None
    validation: ValidationConfig | None = None
    loss_sums_fn: LossSumsFn = example_loss_sums
    normalize_by: str = "tokens"
    start_metrics: dict | None = None


def train(setup: TrainingSetup, resume: bool) -> float | None:
    """Run the loop to `setup.steps`; returns the last training loss."""
    env, train_config, model, output_dir = setup.env, setup.train, setup.model, setup.output_dir
    optimizer = build_adamw(model, train_config)
    scheduler = build_scheduler(optimizer, train_config, setup.steps)
    lisa = None
    if setup.lisa.enabled:
        try:
            lisa = LISA(model, optimizer, seed=setup.seed, **setup.lisa.model_dump(exclude={"enabled"}))
        except ValueError as exc:
            raise UserError(f"lisa: {exc}") from None

    start_run(output_dir, setup.config, env.is_main)
    start_step = 0
    checkpoint = latest_checkpoint(output_dir, env) if resume else None
    if checkpoint is not None:
        if lisa is not None:  # before the optimizer state: only parameters that require grad get their state back
            lisa.load_state_dict(read_checkpoint_state(checkpoint)["lisa"])
        state = load_checkpoint(checkpoint, env, {"model": model}, {"model": (model, optimizer)})
        scheduler.load_state_dict(state["scheduler"])
        setup.sampler.load_state_dict(state["sampler"])
        start_step = state["step"]
        log.info("resuming from %s", checkpoint)
    metrics = MetricsLog(output_dir / "metrics.jsonl", env.is_main, resume_step=start_step if resume else None)
    if start_step == 0:
        metrics.write(step=0, event="start", sources=setup.pool.names, source_sizes=setup.pool.sizes,
                      world_size=env.world_size, total_steps=setup.steps,
                      data_stats=[vars(s) for s in setup.pool.stats], **(setup.start_metrics or {}))

    def checkpoint_now(step: int) -> None:
        save_checkpoint(output_dir, step, env, {"model": model}, {"model": (model, optimizer)},
                        {"scheduler": scheduler.state_dict(), "sampler": setup.sampler.state_dict(),
                         "lisa": lisa.state_dict() if lisa is not None else None}, train_config.keep_last)

    def validate(step: int) -> None:
        result = evaluate_loss(model, setup.validation_pool, env, setup.validation.batch_size, setup.precision,
                               setup.pad_id)
        metrics.write(step=step, event="validation", val_loss=result["overall"]["loss"],
                      val_per_source={k: v["loss"] for k, v in result["per_source"].items()})
        log.info("step %d validation loss %.4f", step, result["overall"]["loss"])

    progress = progress_bar(env, setup.steps, setup.name, start_step)
    last_loss = None
    for step in range(start_step, setup.steps):
        global_batch = setup.sampler.next_batch()
        micro_batches = [collate([setup.pool.examples[i] for i in indices], setup.pad_id, indices).to(env.device)
                         for indices in rank_micro_batches(global_batch, env.rank, env.world_size,
                                                           train_config.micro_batch_size)]
        lr = scheduler.get_last_lr()[0]
        started = time.perf_counter()
        result = optimizer_step(model, optimizer, scheduler, micro_batches, env, setup.precision,
                                train_config.max_grad_norm, step + 1, setup.loss_sums_fn, setup.normalize_by)
        elapsed = time.perf_counter() - started
        last_loss = result.loss
        done = step + 1
        if lisa is not None:
            if lisa.steps_taken % lisa.interval == 0:  # first step of a period: its optimizer state now exists
                metrics.write(step=done, event="lisa", **lisa.summary())
            lisa.step()
        if done % train_config.log_every == 0 or done == setup.steps:
            metrics.write(step=done, loss=result.loss, lr=lr, grad_norm=result.grad_norm,
                          supervised_tokens=result.supervised_tokens,
                          tokens_per_s=result.input_tokens / elapsed, step_time_s=elapsed,
                          peak_memory_bytes=peak_memory_bytes(env.device),
                          source_counts=source_counts(setup.pool, global_batch))
        progress.update(1)
        progress.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}")
        if setup.validation_pool is not None and (done % setup.validation.every == 0 or done == setup.steps):
            validate(done)
        if (train_config.checkpoint_every and done % train_config.checkpoint_every == 0) or done == setup.steps:
            checkpoint_now(done)
    progress.close()
    return last_loss
