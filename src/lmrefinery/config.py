"""YAML file + dotted `key=value` overrides → a validated, typed config.

Every command has one config class (below). Unknown keys and bad values are user errors (exit 2) that name the key
path and what was expected, e.g. `train.lr: expected a number, got 'fast'`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmrefinery.errors import UserError

DataFormat = Literal["auto", "alpaca", "sharegpt", "messages", "text2text", "text"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(StrictModel):
    name_or_path: str = Field(description="Hugging Face hub id, local directory, or a built-in alias such as "
                                          "'smollm2-135m-instruct'.")
    tokenizer: str | None = Field(None, description="Tokenizer location when it differs from the model's.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Compute precision. 'bf16' = bf16 autocast "
                                                                    "with fp32 master weights and optimizer state.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = "sdpa"
    gradient_checkpointing: bool = Field(False, description="Non-reentrant activation checkpointing.")
    trust_remote_code: bool = False
    device_map: str | None = Field(None, description="Inference only (teacher, evaluate): e.g. 'auto' spreads a large "
                                                      "model over the local GPUs (needs accelerate).")


class SourceConfig(StrictModel):
    name: str = Field(description="Name recorded in every output (weights, metrics, reports).")
    path: str = Field(description=".json, .jsonl, .parquet file or a datasets save_to_disk directory.")
    format: DataFormat = "auto"
    limit: int | None = Field(None, ge=1, description="Use only the first N records.")


def unique_source_names(sources: list[SourceConfig]) -> list[SourceConfig]:
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"source names must be unique; repeated: {', '.join(duplicates)}")
    return sources


class DataConfig(StrictModel):
    sources: list[SourceConfig] = Field(min_length=1)
    max_length: int = Field(1024, ge=8)
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="'truncate' cuts examples at max_length from the right; 'drop' leaves them out.")
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="'error' stops at the first bad record (exit 2); 'skip' leaves it out and counts it.")
    system_prompt: str | None = Field(
        None, description="System message for conversations that have none; None leaves the chat template's default.")

    _unique = field_validator("sources")(unique_source_names)


class SamplingConfig(StrictModel):
    strategy: Literal["uniform", "proportional", "weights"] = Field(
        "proportional",
        description="'proportional': shuffled passes over the pooled examples; 'uniform': each source equally "
                    "often; 'weights': sources drawn by the given weights.")
    weights: dict[str, float] | str | None = Field(
        None, description="With strategy 'weights': a {source: weight} mapping or a path to a weights.json file.")

    @model_validator(mode="after")
    def _weights_given(self) -> "SamplingConfig":
        if self.strategy == "weights" and self.weights is None:
            raise ValueError("strategy 'weights' needs sampling.weights (a mapping or a weights.json path)")
        return self


class TrainConfig(StrictModel):
    steps: int | None = Field(None, ge=1, description="Optimizer steps; default: one epoch of the pool.")
    epochs: float | None = Field(None, gt=0, description="Used when steps is not set.")
    batch_size: int = Field(8, ge=1, description="Global batch (examples per optimizer step, all ranks together).")
    micro_batch_size: int = Field(1, ge=1, description="Examples per forward pass on one rank.")
    lr: float = Field(2e-5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    warmup_steps: int | None = Field(None, ge=0, description="Overrides warmup_ratio when set.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Floor of the cosine/linear decay, as a fraction of lr.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")
    log_every: int = Field(1, ge=1)
    checkpoint_every: int | None = Field(None, ge=1, description="Steps between checkpoints; null = only at the end.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")


class LISAConfig(StrictModel):
    enabled: bool = False
    layers: int = Field(2, ge=1, description="Decoder blocks trained at a time (γ).")
    interval: int = Field(20, ge=1, description="Optimizer steps between switches (K).")
    train_embeddings: bool = Field(True, description="Keep the input embedding trainable.")
    train_head: bool = Field(True, description="Keep the LM head trainable (must equal train_embeddings when tied).")
    keep_state: bool = Field(False, description="Keep AdamW state of deactivated blocks (memory comparison only).")


class ValidationConfig(StrictModel):
    sources: list[SourceConfig] = Field(min_length=1)
    every: int = Field(50, ge=1, description="Evaluate every N optimizer steps (and at the end).")
    batch_size: int = Field(8, ge=1)

    _unique = field_validator("sources")(unique_source_names)


class SFTConfig(StrictModel):
    output_dir: str
    seed: int = 0
    model: ModelConfig
    data: DataConfig
    sampling: SamplingConfig = SamplingConfig()
    validation: ValidationConfig | None = None
    train: TrainConfig = TrainConfig()
    lisa: LISAConfig = LISAConfig()
    save_model: bool = Field(True, description="Write the final model (+ tokenizer) in HF format to output_dir/model.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="ε: each token's loss is (1 − ε)·CE + ε·mean over "
                                                                 "the vocabulary of −log p.")


class ScaleBiOConfig(StrictModel):
    alpha: float = Field(100.0, gt=0, description="Penalty α (authors: 100 for 7B–34B models, 10 for GPT-2).")
    tau: float = Field(1.0, gt=0, description="Continuation: α ← α·τ each round, learning rates ÷ τ (authors: 1).")
    rounds: int = Field(1, ge=1, description="Outer rounds of the α/τ continuation.")
    lr_lower: float = Field(1e-5, ge=0, description="Peak learning rate of u (lower-level model).")
    lr_upper: float = Field(1e-5, ge=0, description="Peak learning rate of w (upper-level model).")
    lr_weights: float = Field(1e-2, ge=0, description="Peak learning rate of the source logits λ.")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(5e-4, ge=0, description="On u and w; λ never has weight decay.")
    max_grad_norm: float | None = Field(None, gt=0, description="Clip u's and w's gradient norms (null: off).")
    max_weight_grad_norm: float | None = Field(None, gt=0, description="Clip λ's gradient norm (null: off).")


class ReweightTrainConfig(StrictModel):
    steps: int | None = Field(None, ge=1, description="ScaleBiO steps; default: epochs × pool / batch_size.")
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1, description="Global training batch per step (all processes).")
    val_batch_size: int = Field(8, ge=1, description="Global validation batch per step (all processes).")
    micro_batch_size: int = Field(1, ge=1, description="Examples per forward pass on one process.")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    log_every: int = Field(1, ge=1)
    checkpoint_every: int | None = Field(None, ge=1)
    keep_last: int = Field(2, ge=1)


class ReweightConfig(StrictModel):
    output_dir: str
    seed: int = 0
    model: ModelConfig
    data: DataConfig
    validation: ValidationConfig = Field(description="The target: a small validation set (sources pooled).")
    scalebio: ScaleBiOConfig = ScaleBiOConfig()
    train: ReweightTrainConfig = ReweightTrainConfig()
    lisa: LISAConfig = Field(LISAConfig(), description="LISA on u and w, with independent layer draws.")
    save_upper_model: bool = Field(False, description="Also write w (the upper-level model) in HF format.")


class MixConfig(StrictModel):
    output_dir: str
    sources: list[SourceConfig] = Field(min_length=1)
    weights: dict[str, float] | str = Field(description="{source: weight} or a weights.json path (from reweight).")
    num_examples: int = Field(ge=1, description="N: size of the mixture.")
    seed: int = 0
    on_bad_record: Literal["error", "skip"] = "error"

    _unique = field_validator("sources")(unique_source_names)


class TeacherConfig(StrictModel):
    output_dir: str = Field(description="The cache directory.")
    seed: int = 0
    model: ModelConfig = Field(description="The fine-tuned teacher.")
    data: DataConfig
    k: int = Field(5, ge=1, le=64, description="Top-k token probabilities kept per response position.")
    batch_size: int = Field(8, ge=1, description="Examples per teacher forward pass.")
    shard_size: int = Field(256, ge=1, description="Examples per cache shard (the unit of resume).")
    logprob_dtype: Literal["float16", "float32"] = "float16"


class CalibrationSettings(StrictModel):
    transform: Literal["prob_temperature", "logit_temperature"] = "prob_temperature"
    objective: Literal["ece", "nll"] = "ece"
    n_bins: int = Field(10, ge=2)
    grid: list[float] | None = Field(
        None, min_length=1, description="Coarse grid of temperatures; default 0.1 … 1.0 for prob_temperature, "
                                        "0.25 … 3.0 for logit_temperature. Extended upward while the best is its "
                                        "largest value.")
    fine_step: float = Field(0.02, gt=0, description="Then this step within ± one coarse step of the best.")


class CalibrateConfig(CalibrationSettings):
    output_dir: str
    cache: str = Field(description="A teacher cache of held-out data (not the distillation training data).")


class StudentConfig(StrictModel):
    init: Literal["model", "keep-layers"] = Field(
        "keep-layers", description="'model': load name_or_path; 'keep-layers': a subset of the teacher's blocks.")
    name_or_path: str | None = None
    keep_every: int = Field(3, ge=1, description="keep-layers: keep blocks 0, n, 2n, …")
    keep_layers: list[int] | None = Field(None, description="keep-layers: explicit block indices instead.")
    precision: Literal["fp32", "bf16"] = "fp32"
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = "sdpa"
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _path_for_model_init(self) -> "StudentConfig":
        if self.init == "model" and not self.name_or_path:
            raise ValueError("init 'model' needs student.name_or_path")
        return self


class DistillLossConfig(StrictModel):
    mode: Literal["cache", "online"] = Field("cache", description="'online': full-vocabulary KD from a live teacher.")
    teacher_transform: Literal["linear", "prob_temperature", "logit_temperature"] = "prob_temperature"
    temperature: float | None = Field(None, gt=0, description="c or T; default: from `calibration`, else 1.0.")
    calibration: str | None = Field(None, description="calibration.json from `lmrefinery calibrate`.")
    other_bucket: bool = False
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    reduction: Literal["token_mean", "sequence_sum"] = "token_mean"
    hard_label_weight: float = Field(0.0, ge=0, le=1, description="β: loss = (1 − β)·KL + β·cross-entropy.")
    online_temperature: float = Field(1.0, gt=0, description="Softmax temperature of online KD (loss × T²).")


class DistillConfig(StrictModel):
    output_dir: str
    seed: int = 0
    cache: str = Field(description="The teacher cache of the training data (`lmrefinery teacher`).")
    student: StudentConfig = StudentConfig()
    loss: DistillLossConfig = DistillLossConfig()
    sampling: SamplingConfig = SamplingConfig()
    validation: ValidationConfig | None = None
    train: TrainConfig = TrainConfig()
    lisa: LISAConfig = LISAConfig()
    save_model: bool = True


class EvaluateConfig(StrictModel):
    output_dir: str
    task: Literal["loss", "mcq", "exact_match"] = "loss"
    seed: int = 0
    model: ModelConfig
    data: DataConfig = Field(description="loss: the sources to score; mcq: the multiple-choice files; exact_match: "
                                         "conversations whose last turn is the reference answer.")
    batch_size: int = Field(8, ge=1)
    n_bins: int = Field(10, ge=2, description="mcq and loss: calibration bins.")
    temperature: float = Field(1.0, gt=0, description="mcq: divide the logits by T before the softmax (post-hoc "
                                                       "temperature scaling, e.g. fitted by `compare`).")
    max_new_tokens: int = Field(32, ge=1, description="exact_match: greedy decoding length.")


class DemoConfig(StrictModel):
    output_dir: str = "demo-out"
    preset: Literal["quick", "default"] = "default"
    seed: int = 0
    model: str = Field("smollm2-135m-instruct", description="The model both stories start from.")
    max_length: int | None = Field(None, ge=32, description="Token limit per example; default: the preset's.")


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override '{text}': expected key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{text}': expected a dotted key such as train.lr")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    node: Any = tree
    for depth, part in enumerate(path[:-1]):
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise UserError(f"override {'.'.join(path)}: '{where}' is a value, not a section")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(path))] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(f"override {where}: expected a list index below {len(node)}")
    return int(part)


def _describe_error(error: dict) -> str:
    path = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key"
    if kind == "missing":
        return f"{path}: required key is missing"
    got = error.get("input")
    got_text = "" if isinstance(got, dict) else f", got {got!r}"
    return f"{path}: {error['msg'][0].lower()}{error['msg'][1:]}{got_text}"


def validate_config(cls: type[ConfigT], tree: dict, origin: str = "config") -> ConfigT:
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        lines = [_describe_error(e) for e in exc.errors()]
        raise UserError(f"{origin}: " + "; ".join(lines)) from None


def load_config(cls: type[ConfigT], path: str | os.PathLike | None, overrides: list[str] = ()) -> ConfigT:
    tree: dict = {}
    origin = "command line"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read config file ({exc.__class__.__name__}: {exc})") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(tree, dict):
            raise UserError(f"{path}: expected a mapping of config keys at the top level")
    for text in overrides:
        apply_override(tree, *_parse_override(text))
    return validate_config(cls, tree, origin)


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
