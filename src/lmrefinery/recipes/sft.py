"""`lmrefinery sft`: supervised fine-tuning on one or several sources with a chosen sampling.

setup (config, data, model — all validated before the run directory is touched) → train (the shared loop:
token-mean loss over the global batch, checkpoints, optional LISA or LoRA and validation) → save (HF model +
tokenizer, or the LoRA adapter; summary.json).
"""

from __future__ import annotations

from pathlib import Path

from lmrefinery.config import SFTConfig
from lmrefinery.models import load_model
from lmrefinery.recipes.common import begin_training_run, load_data, train_supervised, trainable_model
from lmrefinery.train.losses import example_loss_sums, label_smoothed_loss_sums


def run(config: SFTConfig, resume: bool | str = False) -> Path:
    resume = resume or config.resume  # the --resume flag, else the config's `resume`
    env, output_dir = begin_training_run(config, resume)
    tokenizer, pool, extras = load_data(config.model, config.data,
                                        {"validation": config.validation.sources if config.validation else []})
    model = trainable_model(load_model(config.model, env.device, max_length=config.data.max_length), config.lora, env, config.seed)
    train_supervised(
        name="sft", config=config, output_dir=output_dir, env=env, model=model, tokenizer=tokenizer, pool=pool,
        sampling=config.sampling, train=config.train, precision=config.model.precision, lisa=config.lisa,
        seed=config.seed, save_model=config.save_model, validation_pool=extras.get("validation"),
        validation=config.validation,
        loss_sums_fn=label_smoothed_loss_sums(config.label_smoothing) if config.label_smoothing else example_loss_sums,
        summary={"sampling": config.sampling.model_dump(mode="json")}, resume=resume)
    return output_dir
