"""One config class per command, composed from the shared sections."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from lmrefinery.config.loading import StrictModel, path_field
from lmrefinery.config.sections import (CalibrationBinsConfig, CalibrationSettings, ComputeConfig,
                                        ConversationSourcesConfig, DataConfig, LISAConfig, LoRAConfig, ModelConfig,
                                        RecordSourcesConfig, ResumableConfig, RunConfig, SamplingConfig, ScheduleConfig,
                                        TrackingConfig, TrainConfig, ValidationConfig)


class LisaOrLoraConfig(StrictModel):
    """A trained model's parameter-efficient options: LISA (full parameters, a few blocks at a time) or LoRA."""

    lisa: LISAConfig = Field(LISAConfig(), description="Layerwise importance sampled AdamW (docs/lisa.md).")
    lora: LoRAConfig = Field(LoRAConfig(), description="LoRA adapters on a frozen base (docs/lora.md).")

    @model_validator(mode="after")
    def _one_of_lisa_and_lora(self):
        if self.lisa.enabled and self.lora.enabled:
            raise ValueError("lisa.enabled and lora.enabled: choose one (LISA trains full blocks, LoRA adapters)")
        return self


class SupervisedRunConfig(RunConfig, ResumableConfig, TrackingConfig, LisaOrLoraConfig):
    """What every run that trains one model on token targets has (sft: the data's tokens; distill: the teacher's
    cached distribution over them)."""

    sampling: SamplingConfig = Field(SamplingConfig(), description="How batches draw from the sources.")
    validation: ValidationConfig | None = Field(None, description="Held-out loss during training (optional).")
    train: TrainConfig = Field(TrainConfig(), description="Schedule and optimizer.")
    save_model: bool = Field(True, description="Write the final model (for distill: the student) + tokenizer in HF "
                                               "format to output_dir/model (with LoRA: the adapter to "
                                               "output_dir/adapter).")


class SFTConfig(SupervisedRunConfig):
    model: ModelConfig = Field(description="The model to fine-tune.")
    data: DataConfig = Field(description="The training sources and how to tokenise them (docs/data.md).")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="ε: each token's loss is (1 − ε)·CE + ε·mean over "
                                                                 "the vocabulary of −log p.")


class ScaleBiOConfig(StrictModel):
    alpha: float = Field(100.0, gt=0, description="Penalty α (authors: 100 for 7B–34B models, 10 for GPT-2).")
    tau: float = Field(1.0, gt=0, description="Continuation: α ← α·τ each round, learning rates ÷ τ (authors: 1).")
    rounds: int = Field(1, ge=1, description="Outer rounds of the α/τ continuation.")
    lr_lower: float = Field(1e-5, ge=0, description="Peak learning rate of u (lower-level model).")
    lr_upper: float = Field(1e-5, ge=0, description="Peak learning rate of w (upper-level model).")
    lr_weights: float = Field(1e-2, ge=0, description="Peak learning rate of the source logits λ.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="For u, w and λ.")
    weight_decay: float = Field(5e-4, ge=0, description="On u and w (not on biases and norms); λ never has any.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas of u, w and λ.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon of u, w and λ.")
    max_grad_norm: float | None = Field(None, gt=0, description="Clip u's gradient norm at this and w's (whose loss "
                                                                "carries α) at α × this; null: off.")
    max_weight_grad_norm: float | None = Field(None, gt=0, description="Clip λ's gradient norm (null: off).")
    lisa_draw: Literal["independent", "shared"] = Field(
        "shared", description="With lisa.enabled: u and w share one draw of active blocks (common random numbers), so "
                              "that ℓ_k(w) − ℓ_k(u) does not also measure which blocks each copy happened to train — "
                              "measured 0.34× the λ-gradient spread of independent draws (the authors'; "
                              "'independent'), docs/reweight.md.")
    log_alignment: bool = Field(False, description="Log `alignment` each step: the cosine between w − u and w's "
                                                   "negative validation gradient over the parameters w trains that "
                                                   "step — whether the λ-gradient still acts as an influence "
                                                   "estimate (costs a copy of those gradients per step).")


class ReweightTrainConfig(ScheduleConfig):
    val_batch_size: int = Field(8, ge=1, description="Global validation batch per step (all processes).")
    sampling: Literal["pooled", "stratified"] = Field(
        "pooled", description="'pooled': training batches drawn uniformly from all examples (the paper's); "
                              "'stratified': a fixed share per source in every batch (small sources always present).")


class ReweightConfig(RunConfig, ResumableConfig, TrackingConfig, LisaOrLoraConfig):
    model: ModelConfig = Field(description="The model whose two copies (u, w) are trained.")
    data: DataConfig = Field(description="The candidate sources to weigh.")
    validation: ValidationConfig = Field(description="The target: a small validation set (sources pooled).")
    scalebio: ScaleBiOConfig = Field(ScaleBiOConfig(), description="The bilevel method's settings.")
    train: ReweightTrainConfig = Field(ReweightTrainConfig(), description="Schedule and batches.")
    save_upper_model: bool = Field(False, description="Also write w (the upper-level model) in HF format (with "
                                                      "LoRA: w's adapter, to upper_adapter/).")


class MixConfig(RunConfig):
    data: RecordSourcesConfig = Field(description="The sources the weights name (conversation formats).")
    weights: dict[str, float] | str = path_field(description="{source: weight} or a weights.json path (from "
                                                             "reweight).")
    num_examples: int = Field(ge=1, description="N: size of the mixture.")


class TeacherConfig(RunConfig, ResumableConfig):
    model: ModelConfig = Field(description="The fine-tuned teacher.")
    data: DataConfig = Field(description="The data to cache (the students' training data, or held-out data).")
    k: int = Field(5, ge=1, le=64, description="Top-k token probabilities kept per response position.")
    batch_size: int = Field(8, ge=1, description="Examples per teacher forward pass.")
    shard_size: int = Field(256, ge=1, description="Examples per cache shard (the unit of resume).")
    logprob_dtype: Literal["float16", "float32"] = Field("float16", description="Stored log-probability dtype.")
    packing: bool = Field(False, description="Pack each forward's examples several to a row (exact; "
                                             "docs/sft.md#packing); the cache is the same either way.")


class CalibrateConfig(CalibrationSettings):
    output_dir: str = path_field(description="Where calibration.json and the reliability diagrams go.")
    cache: str = path_field(description="A teacher cache of held-out data (not the distillation training data).")


class StudentConfig(ComputeConfig):
    """The student's weights (its own model, or some of the teacher's blocks) and how it computes.

    It shares ModelConfig's compute fields through ComputeConfig rather than holding a ModelConfig, because a
    keep-layers student has no location of its own.
    """

    init: Literal["model", "keep-layers"] = Field(
        "keep-layers", description="'model': load name_or_path; 'keep-layers': a subset of the decoder blocks of the "
                                   "teacher (or of keep_layers_from).")
    name_or_path: str | None = path_field(None, description="init 'model': the student (hub id, directory or alias).",
                                          resolve="if_exists")
    keep_every: int = Field(3, ge=1, description="keep-layers: keep blocks 0, n, 2n, … (2: about half the blocks)")
    keep_layers: list[int] | None = Field(None, description="keep-layers: explicit block indices instead.")
    keep_layers_from: str | None = path_field(
        None, description="keep-layers: take the blocks (with the embeddings, final norm and head) from this model "
                          "instead of the teacher — e.g. the pretrained model the teacher was fine-tuned from, so "
                          "that the student has not seen the task; it must share the teacher's vocabulary.",
        resolve="if_exists")

    @model_validator(mode="after")
    def _path_for_model_init(self) -> "StudentConfig":
        if self.init == "model" and not self.name_or_path:
            raise ValueError("init 'model' needs student.name_or_path")
        if self.init == "model" and self.keep_layers_from:
            raise ValueError("student.keep_layers_from is for init 'keep-layers'; init 'model' loads name_or_path")
        return self

    def compute(self) -> dict:
        return {name: getattr(self, name) for name in ComputeConfig.model_fields}


class DistillLossConfig(StrictModel):
    mode: Literal["cache", "online"] = Field("cache", description="'online': full-vocabulary KD from a live teacher.")
    teacher_transform: Literal["linear", "prob_temperature", "logit_temperature"] = Field(
        "prob_temperature", description="How the cached top-k become the target distribution.")
    temperature: float | None = Field(None, gt=0, description="c or T; default: from `calibration`, else 1.0.")
    calibration: str | None = path_field(None, description="calibration.json from `lmrefinery calibrate`.")
    other_bucket: bool = Field(True, description="A k+1-th bucket holds the mass outside the teacher's top-k, so the "
                                                 "student also learns how much mass those tokens carry; false: the "
                                                 "paper's restricted loss over the k tokens alone, which cannot keep "
                                                 "the student's mass on them (docs/distill.md).")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="ε of probability-space smoothing of the target.")
    reduction: Literal["token_mean", "sequence_sum"] = Field(
        "token_mean", description="Mean over supervised tokens, or the authors' sum per sequence / batch size.")
    hard_label_weight: float = Field(0.0, ge=0, le=1, description="β: loss = (1 − β)·KL + β·cross-entropy.")
    online_temperature: float = Field(1.0, gt=0, description="Softmax temperature of online KD (loss × T²).")


class DistillConfig(SupervisedRunConfig):
    cache: str = path_field(description="The teacher cache of the training data (`lmrefinery teacher`).")
    student: StudentConfig = Field(StudentConfig(), description="The student's init and compute settings.")
    loss: DistillLossConfig = Field(DistillLossConfig(), description="The distillation loss.")

    @model_validator(mode="after")
    def _keep_layers_adapters_are_merged(self):
        # a keep-layers student exists only inside this run: an adapter saved alone would name a base nobody has
        if self.lora.enabled and self.student.init == "keep-layers" and self.save_model and not self.lora.merge:
            raise ValueError("lora with student.init keep-layers: set lora.merge: true (the kept-blocks base model "
                             "is not saved anywhere else, so the adapter alone could not be loaded)")
        return self


class _EvaluateCommon(RunConfig):
    model: ModelConfig = Field(description="The model to score.")
    batch_size: int = Field(8, ge=1, description="Examples per forward pass.")


class LossEvaluateConfig(_EvaluateCommon, CalibrationBinsConfig):
    task: Literal["loss"] = Field("loss", description="Token-mean loss, perplexity, next-token calibration.")
    data: DataConfig = Field(description="The sources to score, tokenised as in training.")
    packing: bool = Field(False, description="Pack each forward's examples several to a row (exact; "
                                             "docs/sft.md#packing).")


class MCQEvaluateConfig(_EvaluateCommon, CalibrationBinsConfig):
    task: Literal["mcq"] = Field(description="Multiple-choice accuracy and calibration.")
    data: ConversationSourcesConfig = Field(description="Multiple-choice item files (docs/evaluate.md).")
    temperature: float = Field(1.0, gt=0, description="Divide the logits by T before the softmax (post-hoc "
                                                       "temperature scaling, e.g. fitted by `compare`).")


class ExactMatchEvaluateConfig(_EvaluateCommon):
    task: Literal["exact_match"] = Field(description="Greedy answers scored against references.")
    data: ConversationSourcesConfig = Field(description="Conversations whose last turn is the reference answer.")
    max_new_tokens: int = Field(32, ge=1, description="Greedy decoding length.")


class LMEvalEvaluateConfig(_EvaluateCommon, CalibrationBinsConfig):
    task: Literal["lm-eval"] = Field(description="lm-evaluation-harness tasks, plus calibration of the "
                                                 "multiple-choice ones.")
    tasks: list[str] = path_field(description="lm-eval task names, or task YAML files (their relative data paths "
                                              "are read beside the YAML).", resolve="if_exists", min_length=1)
    include_path: str | None = path_field(None, description="A directory of extra lm-eval task YAMLs.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples; default: each task's own.")
    limit: int | None = Field(None, ge=1, description="Score only the first N documents of each task.")
    apply_chat_template: bool = Field(False, description="Wrap each prompt in the model's chat template.")


EVALUATE_TASKS = ("loss", "mcq", "exact_match", "lm-eval")


def _evaluate_task(tree) -> str:
    task = tree.get("task", "loss") if isinstance(tree, dict) else getattr(tree, "task", "loss")
    return task if task in EVALUATE_TASKS else "loss"


EvaluateConfig = Annotated[Union[Annotated[LossEvaluateConfig, Tag("loss")],
                                 Annotated[MCQEvaluateConfig, Tag("mcq")],
                                 Annotated[ExactMatchEvaluateConfig, Tag("exact_match")],
                                 Annotated[LMEvalEvaluateConfig, Tag("lm-eval")]],
                           Discriminator(_evaluate_task)]


class CalibrationReportConfig(CalibrationBinsConfig):
    samples: list[str] = path_field(description="lm-eval --log_samples files (samples_<task>_<date>.jsonl).",
                                    min_length=1)
    output_dir: str = path_field("calibration-report", description="Where calibration.json and plots/ go.")
    target_delimiter: str = Field(" ", description="The tasks' target_delimiter (lm-eval's default ' '): removed "
                                                   "from each continuation to get the choice whose length "
                                                   "acc_norm divides by.")


class DemoConfig(StrictModel):
    output_dir: str = path_field("demo-out", description="Everything the demo writes.")
    preset: Literal["quick", "default"] = Field("default", description="Sizes: 'quick' (≈ 3 min) or 'default'.")
    seed: int = Field(0, description="Seeds the data and every stage.")
    model: str = path_field("smollm2-135m-instruct", description="The model both stories start from.",
                            resolve="if_exists")
    max_length: int | None = Field(None, ge=32, description="Token limit per example; default: the preset's.")
