"""`lmrefinery distill`: train a student on the teacher's cached top-k distributions (FIRST), or — as a baseline —
by full-vocabulary KD from a live teacher.

setup (the cache and the very examples it was made from; the student: its own model or `keep-layers` of the
teacher; the temperature from calibrate) → the shared supervised run with the distillation loss → save.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from lmrefinery.config import DistillConfig, ModelConfig, validate_config
from lmrefinery.data.sources import load_pool
from lmrefinery.data.tokenize import ChatEncoder
from lmrefinery.distill.losses import online_kd_sums, topk_distillation_sums
from lmrefinery.distill.student import every_nth, keep_layers
from lmrefinery.errors import UserError
from lmrefinery.models import find_decoder_layers, load_model
from lmrefinery.models.loading import enable_activation_checkpointing
from lmrefinery.recipes.common import begin_training_run, load_cache_with_data, train_supervised
from lmrefinery.train.distributed import shard_model
from lmrefinery.train.losses import causal_logits, response_logits

log = logging.getLogger(__name__)


def teacher_model_config(manifest: dict, compute: dict | None = None) -> ModelConfig:
    """The teacher's model config from the cache manifest, computing as the student does when `compute` is given."""
    config = validate_config(ModelConfig, manifest["model"], "cache manifest model")
    return config.model_copy(update=compute) if compute is not None else config


def build_student(config: DistillConfig, manifest: dict, device) -> torch.nn.Module:
    compute = config.student.compute() | {"gradient_checkpointing": False}
    if config.student.init == "model":
        model = load_model(ModelConfig(name_or_path=config.student.name_or_path, **compute), device)
    else:
        teacher = load_model(teacher_model_config(manifest, compute), device)
        total = len(find_decoder_layers(teacher))
        keep = config.student.keep_layers or every_nth(total, config.student.keep_every)
        try:
            model = keep_layers(teacher, keep)
        except ValueError as exc:
            raise UserError(f"student.keep_layers: {exc}") from None
        del teacher
        log.info("student: teacher blocks %s of %d", keep, total)
    if config.student.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def resolve_temperature(config: DistillConfig) -> float:
    if config.loss.temperature is not None:
        return config.loss.temperature
    if config.loss.calibration:
        path = Path(config.loss.calibration)
        try:
            calibration = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: cannot read calibration.json ({exc})") from None
        if calibration.get("transform") != config.loss.teacher_transform:
            raise UserError(f"{path}: temperature fitted for {calibration.get('transform')!r}, but "
                            f"loss.teacher_transform is {config.loss.teacher_transform!r}")
        return float(calibration["temperature"])
    return 1.0


def cached_loss_fn(cache, loss, temperature: float):
    """Loss sums of a batch against its cache rows (looked up by the batch's pool indices)."""
    settings = {"teacher_transform": loss.teacher_transform, "temperature": temperature,
                "other_bucket": loss.other_bucket, "label_smoothing": loss.label_smoothing,
                "hard_label_weight": loss.hard_label_weight}

    def loss_sums(model, batch, precision):
        ids, logprobs, tail = cache.batch_rows(batch.example_ids.tolist())
        return topk_distillation_sums(response_logits(model, batch, precision), ids, logprobs, tail, **settings)
    return loss_sums


def online_loss_fn(teacher, temperature: float):
    def loss_sums(model, batch, precision):
        response = response_logits(model, batch, precision)
        with torch.no_grad():
            teacher_logits = causal_logits(teacher, batch, precision)[:, :-1][response.mask]
        return online_kd_sums(response, teacher_logits, temperature)
    return loss_sums


def run(config: DistillConfig, resume: bool = False) -> Path:
    env, output_dir = begin_training_run(config, resume)
    student_tokenizer = None
    if config.student.init == "model":  # its own tokenizer must be the teacher's (checked by fingerprint)
        student_tokenizer = ModelConfig(name_or_path=config.student.name_or_path)
    cache, tokenizer, pool, data = load_cache_with_data(config.cache, student_tokenizer)
    validation_pool = None
    if config.validation is not None:  # tokenised exactly like the training data
        validation_pool = load_pool(config.validation.sources, ChatEncoder(tokenizer, data.system_prompt), data)
    temperature = resolve_temperature(config)
    model = build_student(config, cache.manifest, env.device)
    cache.check_vocabulary(model.get_output_embeddings().weight.shape[0])
    if config.loss.mode == "online":
        compute = config.student.compute() | {"gradient_checkpointing": False}
        teacher = load_model(teacher_model_config(cache.manifest, compute), env.device).eval()
        loss_fn = online_loss_fn(teacher, config.loss.online_temperature)
    else:
        loss_fn = cached_loss_fn(cache, config.loss, temperature)
    model = shard_model(model, env)
    model.train()
    train_supervised(
        name="distill", config=config, output_dir=output_dir, env=env, model=model, tokenizer=tokenizer, pool=pool,
        sampling=config.sampling, train=config.train, precision=config.student.precision, lisa=config.lisa,
        seed=config.seed, save_model=config.save_model, validation_pool=validation_pool,
        validation=config.validation, loss_sums_fn=loss_fn,
        normalize_by="tokens" if config.loss.reduction == "token_mean" else "examples",
        start_metrics={"temperature": temperature, "mode": config.loss.mode},
        summary={"mode": config.loss.mode, "teacher": cache.manifest["teacher"], "temperature": temperature,
                 "teacher_transform": config.loss.teacher_transform}, resume=resume)
    return output_dir
