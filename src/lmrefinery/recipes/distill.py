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
from lmrefinery.models import find_decoder_layers, load_model, load_tokenizer
from lmrefinery.models.loading import enable_activation_checkpointing
from lmrefinery.recipes.common import begin_training_run, load_cache_with_data, train_supervised, trainable_model
from lmrefinery.train.losses import response_logits
from lmrefinery.train.packing_check import check_packing_exact

log = logging.getLogger(__name__)


def teacher_model_config(manifest: dict, compute: dict | None = None) -> ModelConfig:
    """The teacher's model config from the cache manifest, computing as the student does when `compute` is given."""
    config = validate_config(ModelConfig, manifest["model"], "cache manifest model")
    return config.model_copy(update=compute) if compute is not None else config


def build_student(config: DistillConfig, manifest: dict, device) -> torch.nn.Module:
    compute = config.student.compute() | {"gradient_checkpointing": False}
    if config.student.init == "model":
        model = load_model(ModelConfig(name_or_path=config.student.name_or_path, **compute), device,
                           max_length=manifest["data"].get("max_length"))
    else:
        blocks_from = config.student.keep_layers_from
        source = (ModelConfig(name_or_path=blocks_from, **compute) if blocks_from
                  else teacher_model_config(manifest, compute))
        full = load_model(source.model_copy(update={"load_dtype": "float32"}), device,
                          max_length=manifest["data"].get("max_length"))
        total = len(find_decoder_layers(full))
        keep = config.student.keep_layers or every_nth(total, config.student.keep_every)
        try:
            model = keep_layers(full, keep, in_place=True)  # the loaded model becomes the student
        except ValueError as exc:
            raise UserError(f"student.keep_layers: {exc}") from None
        del full
        log.info("student: blocks %s of %d from %s", keep, total,
                 config.student.keep_layers_from or "the teacher")
    if config.student.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def resolve_teacher_transform(config: DistillConfig) -> tuple[str, float]:
    """(transform, temperature): as configured, with the temperature from `loss.calibration` when one is given; the
    teacher unchanged (linear, c = 1) when calibrate found that no temperature improves on it."""
    loss = config.loss
    if loss.temperature is not None or not loss.calibration:
        return loss.teacher_transform, loss.temperature if loss.temperature is not None else 1.0
    path = Path(loss.calibration)
    try:
        calibration = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read calibration.json ({exc})") from None
    if calibration.get("transform") != loss.teacher_transform:
        raise UserError(f"{path}: temperature fitted for {calibration.get('transform')!r}, but "
                        f"loss.teacher_transform is {loss.teacher_transform!r}")
    if calibration.get("improves") is False:
        log.warning("%s: no temperature improved the teacher's calibration on held-out data; distilling from the "
                    "teacher unchanged (linear transform) instead of applying c = %g", path, calibration["temperature"])
        return "linear", 1.0
    return loss.teacher_transform, float(calibration["temperature"])


def cached_loss_fn(cache, loss, transform: str, temperature: float):
    """Loss sums of a batch against its cache rows (looked up by the batch's pool indices)."""
    settings = {"teacher_transform": transform, "temperature": temperature,
                "other_bucket": loss.other_bucket, "label_smoothing": loss.label_smoothing,
                "hard_label_weight": loss.hard_label_weight}

    def loss_sums(model, batch, precision):
        ids, logprobs, tail = cache.batch_rows(batch.example_ids.tolist())
        return topk_distillation_sums(response_logits(model, batch, precision), ids, logprobs, tail, **settings)
    return loss_sums


def online_loss_fn(teacher, temperature: float):
    def loss_sums(model, batch, precision):
        response = response_logits(model, batch, precision)
        check_packing_exact(teacher, batch)  # the teacher may be another architecture than the student
        with torch.no_grad():
            teacher_logits = response_logits(teacher, batch, precision).logits
        return online_kd_sums(response, teacher_logits, temperature)
    return loss_sums


def run(config: DistillConfig, resume: bool | str = False) -> Path:
    resume = resume or config.resume  # the --resume flag, else the config's `resume`
    env, output_dir = begin_training_run(config, resume)
    cache, tokenizer, pool, data = load_cache_with_data(config.cache)  # tokenised as the cache was built
    student_source = config.student.name_or_path if config.student.init == "model" else config.student.keep_layers_from
    if student_source:
        cache.check_student_tokenizer(load_tokenizer(ModelConfig(name_or_path=student_source)), tokenizer)
    validation_pool = None
    if config.validation is not None:  # tokenised exactly like the training data
        validation_pool = load_pool(config.validation.sources, ChatEncoder(tokenizer, data.system_prompt), data)
    transform, temperature = resolve_teacher_transform(config)
    model = build_student(config, cache.manifest, env.device)
    cache.check_vocabulary(model.get_output_embeddings().weight.shape[0])
    if config.loss.mode == "online":
        compute = config.student.compute() | {"gradient_checkpointing": False}
        teacher = load_model(teacher_model_config(cache.manifest, compute), env.device, training=False).eval()
        loss_fn = online_loss_fn(teacher, config.loss.online_temperature)
    else:
        loss_fn = cached_loss_fn(cache, config.loss, transform, temperature)
    model = trainable_model(model, config.lora, env, config.seed)
    summary = train_supervised(
        name="distill", config=config, output_dir=output_dir, env=env, model=model, tokenizer=tokenizer, pool=pool,
        sampling=config.sampling, train=config.train, precision=config.student.precision, lisa=config.lisa,
        seed=config.seed, save_model=config.save_model, validation_pool=validation_pool,
        validation=config.validation, loss_sums_fn=loss_fn,
        normalize_by="tokens" if config.loss.reduction == "token_mean" else "examples",
        start_metrics={"temperature": temperature, "teacher_transform": transform, "mode": config.loss.mode},
        summary={"mode": config.loss.mode, "teacher": cache.manifest["teacher"], "temperature": temperature,
                 "teacher_transform": transform},
        diagnostics=("student_topk_mass",) if config.loss.mode == "cache" else (), resume=resume)
    warn_if_mass_stays_low(summary.get("final_student_topk_mass"), config.loss)
    return output_dir


LOW_MASS = 0.5


def warn_if_mass_stays_low(mass: float | None, loss) -> bool:
    """The renormalised top-k loss cannot raise the student's mass on the teacher's ids (distill/losses.py): say so
    when the run ended with most of the student's probability elsewhere, and what fixes it."""
    if mass is None or mass >= LOW_MASS:
        return False
    remedies = [] if loss.other_bucket else ["loss.other_bucket=true (the mass outside the top-k becomes a bucket)"]
    if loss.hard_label_weight == 0:
        remedies.append("loss.hard_label_weight=0.1 to 0.2 (a little cross-entropy on the true token)")
    log.warning("the student puts only %.3f of its probability on the teacher's top-k tokens (mean over the last "
                "quarter of the steps): the top-k loss fits the ratios among those tokens but cannot raise their "
                "total, so the student's top-1 may be a token the teacher never ranked. %s", mass,
                ("Try " + " or ".join(remedies) + ".") if remedies else "A longer run or a stronger student init may "
                "help.")
    return True
