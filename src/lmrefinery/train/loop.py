"""The training loop every trainer shares (sft, distill, reweight): resume, steps, LISA switches, validation, metrics,
checkpoints, progress.

A recipe describes its run as a `Loop` — what to checkpoint, how often, what to log at the start — and passes a
`step_fn(step) -> metrics` that does one optimizer step (or one ScaleBiO step). The loop owns the order that resume
depends on: LISA's active blocks come back before the optimizer state (the state-dict API restores optimizer state
only for parameters that require grad), then modules and optimizers, then the small stateful objects (samplers,
schedulers, ScaleBiO's λ).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel
from torch import nn
from torch.optim import Optimizer

from lmrefinery.config import ScheduleConfig
from lmrefinery.train.checkpoint import save_checkpoint
from lmrefinery.train.checkpoint_format import latest_checkpoint, read_checkpoint_state
from lmrefinery.train.checkpoint_load import load_checkpoint
from lmrefinery.train.distributed import DistEnv, progress_bar
from lmrefinery.train.precision import peak_memory_bytes
from lmrefinery.train.run_dir import MetricsLog, check_resume_config, start_run
from lmrefinery.train.tracking import Trackers

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class LayerSampler(Stateful, Protocol):
    """What the loop needs of LISA (lmrefinery.lisa.LISA), without depending on it."""

    steps_taken: int
    interval: int

    def step(self) -> bool: ...

    def summary(self) -> dict: ...


@dataclass
class Loop:
    name: str                                      # progress-bar label
    config: BaseModel                              # written to config.yaml
    output_dir: Path
    env: DistEnv
    steps: int
    schedule: ScheduleConfig                       # log_every, checkpoint_every, keep_last
    modules: dict[str, nn.Module]                  # checkpointed as safetensors (full state dicts)
    optimizers: dict[str, tuple[nn.Module, Optimizer]]
    stateful: dict[str, Stateful] = field(default_factory=dict)   # JSON state (samplers, schedulers)
    objects: dict[str, Stateful] = field(default_factory=dict)    # tensor-holding state (ScaleBiO's λ)
    layer_samplers: dict[str, LayerSampler] = field(default_factory=dict)  # LISA, per trained model
    start_record: dict = field(default_factory=dict)              # the step-0 "start" line of metrics.jsonl
    validate: Callable[[int], dict] | None = None                 # step → metrics of a held-out evaluation
    validate_every: int | None = None
    best: dict = field(default_factory=dict)                      # the best validation so far: step, val_loss
    trackers: Trackers | None = None                              # TensorBoard / W&B mirrors of metrics.jsonl
    postfix: Callable[[dict], str] = lambda metrics: f"loss={metrics['loss']:.4f}"


def _keep_best(loop: Loop) -> bool:
    return bool(getattr(loop.schedule, "keep_best", False)) and loop.validate is not None


def _restore(loop: Loop, checkpoint: Path) -> int:
    saved = read_checkpoint_state(checkpoint)
    for name, sampler in loop.layer_samplers.items():
        sampler.load_state_dict(saved["lisa"][name])
    state = load_checkpoint(checkpoint, loop.env, loop.modules, loop.optimizers)
    for name, item in loop.stateful.items():
        item.load_state_dict(state[name])
    loop.best.update(state.get("best") or {})
    for name, item in loop.objects.items():
        item.load_state_dict(state["objects"][name])
    log.info("resuming from %s", checkpoint)
    return int(state["step"])


def _checkpoint(loop: Loop, step: int) -> None:
    state = {name: item.state_dict() for name, item in loop.stateful.items()}
    state["lisa"] = {name: sampler.state_dict() for name, sampler in loop.layer_samplers.items()}
    state["best"] = dict(loop.best)
    objects = {name: item.state_dict() for name, item in loop.objects.items()} or None
    save_checkpoint(loop.output_dir, step, loop.env, loop.modules, loop.optimizers, state, loop.schedule.keep_last,
                    objects=objects, protect=loop.best.get("step") if _keep_best(loop) else None)


def run_loop(loop: Loop, step_fn: Callable[[int], dict[str, Any]], resume: bool | str) -> dict[str, Any]:
    """Run steps until `loop.steps`; returns the last step's metrics (empty when nothing was left to run). With
    validation, `loop.best` ends as the best step and its loss; with `keep_best`, that step's checkpoint is kept."""
    env = loop.env
    checkpoint = latest_checkpoint(loop.output_dir, env) if resume else None
    changed = []
    if checkpoint is not None:  # before config.yaml is rewritten: it is what the checkpoint was made under
        changed = check_resume_config(loop.output_dir, loop.config, read_checkpoint_state(checkpoint)["step"])
    start_run(loop.output_dir, loop.config, env.is_main)
    start_step = _restore(loop, checkpoint) if checkpoint is not None else 0
    # resuming drops the lines after the checkpoint; `resume: auto` with no checkpoint, every line of the dead run
    resume_step = start_step if checkpoint is not None else (-1 if resume == "auto" else None)
    metrics = MetricsLog(loop.output_dir / "metrics.jsonl", env.is_main, resume_step=resume_step,
                         mirror=loop.trackers.log if loop.trackers is not None else None)
    if start_step == 0:
        metrics.write(step=0, event="start", world_size=env.world_size, total_steps=loop.steps, **loop.start_record)
    else:
        metrics.write(step=start_step, event="resume", world_size=env.world_size, changed=changed)

    progress = progress_bar(env, loop.steps, loop.name, start_step)
    try:
        return _steps(loop, step_fn, metrics, progress, start_step)
    finally:
        progress.close()  # before any error message: it must not be drawn over by the bar


def _steps(loop: Loop, step_fn, metrics: MetricsLog, progress, start_step: int) -> dict[str, Any]:
    env, schedule = loop.env, loop.schedule
    last: dict[str, Any] = {}
    for step in range(start_step, loop.steps):
        started = time.perf_counter()
        last = step_fn(step)
        elapsed = time.perf_counter() - started
        done = step + 1
        for name, sampler in loop.layer_samplers.items():
            if sampler.steps_taken % sampler.interval == 0:  # first step of a period: its optimizer state now exists
                metrics.write(step=done, event="lisa" if len(loop.layer_samplers) == 1 else f"lisa_{name}",
                              **sampler.summary())
            sampler.step()
        if done % schedule.log_every == 0 or done == loop.steps:
            extra = {"tokens_per_s": last["input_tokens"] / elapsed} if "input_tokens" in last else {}
            metrics.write(step=done, **{k: v for k, v in last.items() if k != "input_tokens"}, **extra,
                          step_time_s=elapsed, peak_memory_bytes=peak_memory_bytes(env.device))
        progress.update(1)
        progress.set_postfix_str(loop.postfix(last))
        improved = False
        if loop.validate is not None and (done % loop.validate_every == 0 or done == loop.steps):
            result = loop.validate(done)
            metrics.write(step=done, event="validation", **result)
            log.info("step %d validation loss %.4f", done, result["val_loss"])
            improved = result["val_loss"] < loop.best.get("val_loss", float("inf"))
            if improved:
                loop.best.update(step=done, val_loss=result["val_loss"])
        if ((schedule.checkpoint_every and done % schedule.checkpoint_every == 0)
                or (done == loop.steps and schedule.checkpoint_at_end) or (improved and _keep_best(loop))):
            _checkpoint(loop, done)
    return last
