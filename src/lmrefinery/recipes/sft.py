"""`lmrefinery sft`: supervised fine-tuning on one or several sources with a chosen sampling.

setup (config, data, model — all validated before the run directory is touched) → train (the shared loop:
token-mean loss over the global batch, checkpoints, optional LISA and validation) → save (HF model + tokenizer,
summary.json).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lmrefinery.config import SFTConfig
from lmrefinery.data.sampling import MixtureSampler
from lmrefinery.fileio import atomic_write_json
from lmrefinery.models import load_model
from lmrefinery.recipes.common import accumulation_steps, load_data, total_steps, train_supervised
from lmrefinery.train.checkpoint import seed_everything
from lmrefinery.train.distributed import setup_distributed, shard_model
from lmrefinery.train.losses import example_loss_sums, label_smoothed_loss_sums
from lmrefinery.train.run_dir import check_output_dir
from lmrefinery.train.save import save_hf_model

log = logging.getLogger(__name__)


def run(config: SFTConfig, resume: bool = False) -> Path:
    env = setup_distributed()
    output_dir = check_output_dir(config.output_dir, resume)
    seed_everything(config.seed, env.rank)
    tokenizer, pool, extras = load_data(config.model, config.data,
                                        {"validation": config.validation.sources if config.validation else []})
    accumulation = accumulation_steps(config.train.batch_size, config.train.micro_batch_size, env.world_size)
    steps = total_steps(config.train.steps, config.train.epochs, pool, config.train.batch_size)
    sampler = MixtureSampler.build(config.sampling, pool.names, pool.source_indices(), config.train.batch_size,
                                   config.seed)
    model = shard_model(load_model(config.model, env.device), env)
    model.train()

    last = train_supervised(
        name="sft", config=config, output_dir=output_dir, env=env, model=model, pad_id=tokenizer.pad_token_id,
        pool=pool, sampler=sampler, steps=steps, train=config.train, precision=config.model.precision,
        lisa=config.lisa, seed=config.seed, validation_pool=extras.get("validation"), validation=config.validation,
        start_metrics={"accumulation": accumulation},
        loss_sums_fn=label_smoothed_loss_sums(config.label_smoothing) if config.label_smoothing else example_loss_sums,
        resume=resume)

    model_dir = output_dir / "model"
    if config.save_model:
        save_hf_model(model, tokenizer, model_dir, env)
    if env.is_main:
        atomic_write_json(output_dir / "summary.json", {
            "command": "sft", "steps": steps, "final_loss": last.get("loss"), "sources": pool.names,
            "source_sizes": pool.sizes, "sampling": config.sampling.model_dump(mode="json"),
            "model": str(model_dir) if config.save_model else None})
        log.info("outputs in %s (model: %s, metrics: %s)", output_dir, model_dir, output_dir / "metrics.jsonl")
    return output_dir
