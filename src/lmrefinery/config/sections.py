"""Config sections shared by several commands: model, data, sampling, training schedule, LISA, validation.

Commands compose these (config/commands.py); where two commands need almost the same section, one extends the other
instead of re-declaring its fields, so a key means the same thing everywhere.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmrefinery.config.loading import StrictModel, path_field

DataFormat = Literal["auto", "alpaca", "sharegpt", "messages", "text2text", "text"]
Precision = Literal["auto", "fp32", "bf16"]
Attention = Literal["auto", "eager", "sdpa", "flash_attention_2"]


class RunConfig(StrictModel):
    """What every command that writes a run has."""

    output_dir: str = path_field(description="Where the command writes. A training command refuses a directory that "
                                             "already holds a run unless --resume is given.")
    seed: int = Field(0, description="Seeds data order, sampling, LISA draws and initialisation noise: a run is "
                                     "deterministic for a seed.")


class ResumableConfig(StrictModel):
    """What a command that can continue an interrupted run has."""

    resume: bool | Literal["auto"] = Field(
        False, description="true: continue from the newest complete checkpoint (as --resume); 'auto': continue when "
                           "there is one, start afresh when there is none — what an elastic restart (torchrun "
                           "--max-restarts) or a preempted cluster job needs. --resume / --resume auto override it.")


class TrackingConfig(StrictModel):
    """Where a training run's metrics are also sent (metrics.jsonl is always written)."""

    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Also log scalars per step and the plots at the end to TensorBoard "
                                          "(output_dir/tensorboard) and/or Weights & Biases (offline by default).")


class ComputeConfig(StrictModel):
    """How a model computes: shared by every model a command loads (the trained model, a student)."""

    precision: Precision = Field("auto", description="Compute precision. 'bf16' = bf16 autocast with fp32 master "
                                                     "weights and optimizer state; 'auto' = bf16 where the CPU/GPU "
                                                     "computes it natively (AVX512_BF16, AMX, CUDA), else fp32.")
    attn_implementation: Attention | None = Field(
        "auto", description="Attention kernel passed to transformers. 'auto' = eager when training on CPU with "
                            "data.max_length <= 384 (faster there), else sdpa.")
    gradient_checkpointing: bool = Field(False, description="Non-reentrant activation checkpointing.")
    compile: bool = Field(False, description="torch.compile each decoder block (inductor, dynamic shapes): faster "
                                             "steps after a one-off compile of tens of seconds per process; worth it "
                                             "for runs of more than a few minutes (docs/benchmarks.md).")


class ModelConfig(ComputeConfig):
    name_or_path: str = path_field(description="Hugging Face hub id, local directory, or a built-in alias such as "
                                               "'smollm2-135m-instruct'.", resolve="if_exists")
    load_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Weights in memory. Training keeps fp32 masters (bf16 compute comes from precision); "
                               "bfloat16 halves a teacher's or an evaluated model's memory (teacher, evaluate).")
    tokenizer: str | None = path_field(None, description="Tokenizer location when it differs from the model's.",
                                       resolve="if_exists")
    trust_remote_code: bool = Field(False, description="Let transformers run the model repository's own code.")
    device_map: str | None = Field(None, description="Inference only (teacher, evaluate): e.g. 'auto' spreads a large "
                                                      "model over the local GPUs (needs accelerate).")


class SourceConfig(StrictModel):
    name: str = Field(description="Name recorded in every output (weights, metrics, reports).")
    path: str = path_field(description=".json, .jsonl, .parquet file, a datasets save_to_disk directory, a directory "
                                       "of data files or a Hugging Face dataset id (read with datasets.load_dataset).",
                           resolve="if_exists")
    split: str | None = Field(None, description="With a dataset id or a directory of data files: the split (default "
                                                "train).")
    subset: str | None = Field(None, description="With a dataset id: the configuration (subset) name.")
    format: DataFormat = Field("auto", description="Record format; 'auto' detects it from the first record.")
    limit: int | None = Field(None, ge=1, description="Use only the first N records.")


def check_unique(names: list[str], hint: str = "") -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"source names must be unique; repeated: {', '.join(duplicates)}{hint}")


def unique_source_names(sources: list[SourceConfig] | None) -> list[SourceConfig] | None:
    check_unique([s.name for s in sources or []])
    return sources


class RecordSourcesConfig(StrictModel):
    """Files to read, record by record (`mix`)."""

    sources: list[SourceConfig] = Field(min_length=1, description="Named data files.")
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="'error' stops at the first bad record (exit 2); 'skip' leaves it out and counts it.")

    _unique = field_validator("sources")(unique_source_names)


class ConversationSourcesConfig(RecordSourcesConfig):
    """Files whose conversations a model reads (the evaluation tasks that score items rather than tokens)."""

    system_prompt: str | None = Field(
        None, description="System message for conversations that have none; None leaves the chat template's default.")


class DataConfig(ConversationSourcesConfig):
    """Sources tokenised for training or loss evaluation."""

    max_length: int = Field(1024, ge=8, description="Token limit per example.")
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="'truncate' cuts examples at max_length from the right; 'drop' leaves them out.")
    cache: bool = Field(True, description="Keep each local source's tokenised examples on disk (datasets/Arrow, under "
                                          "$LMREFINERY_CACHE/pools) and reuse them while files, tokenizer and these "
                                          "settings are unchanged.")
    num_proc: int = Field(1, ge=1, description="Processes that tokenise each source (records are still read and "
                                               "checked in order here); worth it from ~100k examples. The result "
                                               "is the same for any value.")


class SamplingConfig(StrictModel):
    strategy: Literal["uniform", "proportional", "weights", "stratified"] = Field(
        "proportional",
        description="'proportional': shuffled passes over the pooled examples; 'uniform': each source equally "
                    "often; 'weights': sources drawn by the given weights; 'stratified': a fixed, equal share of "
                    "every batch per source.")
    weights: dict[str, float] | str | None = path_field(
        None, description="With strategy 'weights': a {source: weight} mapping or a path to a weights.json file.")

    @model_validator(mode="after")
    def _weights_given(self) -> "SamplingConfig":
        if self.strategy == "weights" and self.weights is None:
            raise ValueError("strategy 'weights' needs sampling.weights (a mapping or a weights.json path)")
        return self


class ScheduleConfig(StrictModel):
    """How long, in what batches, with what learning-rate shape, and how often to log and checkpoint."""

    steps: int | None = Field(None, ge=1, description="Optimizer steps; default: `epochs` passes over the pool.")
    epochs: float | None = Field(None, gt=0, description="Used when steps is not set (default 1).")
    batch_size: int = Field(8, ge=1, description="Global batch (examples per optimizer step, all ranks together).")
    micro_batch_size: int = Field(1, ge=1, description="Examples per forward pass on one rank.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after the warmup.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Linear warmup over this fraction of the steps.")
    warmup_steps: int | None = Field(None, ge=0, description="Overrides warmup_ratio when set.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Floor of the cosine/linear decay, as a fraction of lr.")
    log_every: int = Field(1, ge=1, description="Steps between metrics.jsonl lines.")
    checkpoint_every: int | None = Field(None, ge=1, description="Steps between checkpoints; null = only at the end.")
    checkpoint_at_end: bool = Field(True, description="Also checkpoint after the last step (model, optimizer and "
                                                      "sampler state: to train on from it). false: a run without "
                                                      "checkpoint_every writes no checkpoint, only its model.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")


class OptimizerConfig(StrictModel):
    lr: float = Field(2e-5, ge=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (never on biases and norms).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")


class TrainConfig(ScheduleConfig, OptimizerConfig):
    """The schedule and the optimizer of a single model (sft, distill)."""

    keep_best: bool = Field(False, description="With validation: checkpoint at every new best validation loss, keep "
                                               "that checkpoint, and save its weights as the final model.")
    packing: bool = Field(False, description="Pack each micro-batch's examples several to a row (position ids "
                                             "restart per example, attention stays within it) so less padding is "
                                             "computed; exact, checked on the model's first packed batch "
                                             "(docs/sft.md#packing). Also applies to validation.")


class LISAConfig(StrictModel):
    enabled: bool = Field(False, description="Train only `layers` decoder blocks at a time, switching every "
                                             "`interval` steps.")
    layers: int = Field(2, ge=1, description="Decoder blocks trained at a time (γ).")
    interval: int = Field(20, ge=1, description="Optimizer steps between switches (K).")
    train_embeddings: bool = Field(True, description="Keep the input embedding trainable.")
    train_head: bool = Field(True, description="Keep the LM head trainable (must equal train_embeddings when tied).")
    keep_state: bool = Field(False, description="Keep AdamW state of deactivated blocks (memory comparison only).")


class LoRAConfig(StrictModel):
    """Low-rank adapters (peft's LoRA) on a frozen base model: only the adapters and their AdamW state train."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of the full model (docs/lora.md).")
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha: the adapter's output is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters: names (e.g. [q_proj, v_proj]) or 'all-linear' (every "
                                  "linear layer but the output head).")
    merge: bool = Field(False, description="Also write base + adapters merged into one plain HF model.")


class ValidationConfig(StrictModel):
    sources: list[SourceConfig] = Field(min_length=1, description="Held-out data, tokenised like the training data.")
    every: int = Field(50, ge=1, description="Evaluate every N optimizer steps (and at the end).")
    batch_size: int = Field(8, ge=1, description="Examples per evaluation forward pass.")

    _unique = field_validator("sources")(unique_source_names)


class CalibrationBinsConfig(StrictModel):
    """The one definition of the calibration bins, shared by every command that measures calibration."""

    n_bins: int = Field(10, ge=2, description="Equal-width confidence bins of ECE, MCE and the reliability diagrams "
                                              "(equal-mass ECE uses as many equal-count bins).")


class CalibrationSettings(CalibrationBinsConfig):
    transform: Literal["prob_temperature", "logit_temperature"] = Field(
        "prob_temperature", description="FIRST's temperature on the probabilities, or the usual one on the logits.")
    objective: Literal["ece", "nll"] = Field("ece", description="What the temperature search minimises.")
    positions: Literal["all", "answer"] = Field(
        "all", description="Held-out positions the search scores: 'all' response positions, or 'answer' — the first "
                           "response position of each example (the option letter of multiple-choice conversations; "
                           "the near-certain end-of-turn token after it would otherwise pull the temperature down).")
    grid: list[float] | None = Field(
        None, min_length=1, description="Coarse grid of temperatures; default 0.1 … 1.0 for prob_temperature, "
                                        "0.25 … 3.0 for logit_temperature. Extended upward while the best is its "
                                        "largest value.")
    fine_step: float = Field(0.02, gt=0, description="Then this step within ± one coarse step of the best.")
    cv_folds: int = Field(5, ge=2, description="Folds (of held-out examples) for the out-of-sample ECE of the search, "
                                               "reported beside the in-sample one.")
