"""`lmrefinery compare`'s config: which baselines to run, on which data, under one budget, over which seeds (see
docs/compare.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmrefinery.config.commands import ReweightTrainConfig, ScaleBiOConfig, StudentConfig
from lmrefinery.config.experiment import PRESETS, ExperimentDataConfig
from lmrefinery.config.loading import StrictModel, path_field
from lmrefinery.config.sections import (CalibrationBinsConfig, CalibrationSettings, LISAConfig, ModelConfig,
                                        Precision, SourceConfig, TrainConfig, unique_source_names)

SELECTION_METHODS = ("uniform", "proportional", "less", "rho", "scalebio", "scalebio_at_less_cost")
# `<method>_appended`: the method's own SFT set with the target's validation set appended (its selection reused)
MIXTURE_METHODS = SELECTION_METHODS + tuple(f"{name}_appended" for name in SELECTION_METHODS)
DEFAULT_MIXTURE_METHODS = ["uniform", "proportional", "less", "rho", "scalebio"]
DISTILL_METHODS = ("sft", "sft_temperature", "sft_label_smoothing", "topk_kd", "topk_kd_restricted", "online_kd",
                   "first", "first_restricted", "first_hard_labels")
# Old method names: `first` and `topk_kd` now carry the other bucket (what `distill` ships); the paper's restricted
# loss is `*_restricted`.
RENAMED_METHODS = {"first_other": "first", "topk_kd_other": "topk_kd"}
DEMO_DATA = tuple(PRESETS)


class LESSConfig(StrictModel):
    layers: int = Field(2, ge=1, description="Gradients of the last N decoder blocks are the example features.")
    dim: int = Field(8192, ge=16, description="Dimension of the CountSketch projection of those gradients.")


class RHOConfig(StrictModel):
    reference_steps: int = Field(8, ge=1, description="SFT steps of the reference model on the validation set.")
    reference_lr: float = Field(1e-4, ge=0, description="Learning rate of the reference model.")


class ScaleBiOMethodConfig(StrictModel):
    scalebio: ScaleBiOConfig = ScaleBiOConfig()
    train: ReweightTrainConfig = ReweightTrainConfig()
    lisa: LISAConfig = LISAConfig()
    precision: Precision | None = Field(None, description="Compute precision of the reweight stage alone; unset = "
                                                          "`model.precision`. The λ-gradient can sit below bf16's "
                                                          "rounding (docs/reweight.md#precision): `fp32` here keeps "
                                                          "the SFT stages in the model's precision.")


class PartitionSpec(StrictModel):
    """A source that is a copy of the target corrupted at a known rate (claim (a′))."""

    name: str = Field(description="The source's name in `sources`.")
    kind: Literal["dot", "wrong_answers"] = Field(description="How its corrupted answers were made.")
    rate: float = Field(ge=0, le=1, description="Share of its records corrupted.")


class MixtureCompareConfig(StrictModel):
    methods: list[Literal[MIXTURE_METHODS]] = Field(DEFAULT_MIXTURE_METHODS, min_length=1,
                                                    description="Methods to run; the first-listed is the reference "
                                                                "every other one is compared with (uniform by "
                                                                "default). `scalebio_at_less_cost`: ScaleBiO's "
                                                                "weights after as many reweight steps as cost "
                                                                "LESS-style's selection; `<method>_appended`: that "
                                                                "method's SFT set plus the validation set.")
    sources: list[SourceConfig] | None = Field(None, min_length=1, description="The pool every method draws from "
                                                                                "(filled in by demo_data).")
    validation: list[SourceConfig] | None = Field(None, min_length=1, description="The target's validation set.")
    test: list[SourceConfig] | None = Field(None, min_length=1, description="The target's test set: conversations "
                                                                             "whose last turn is the reference answer.")
    max_length: int = Field(1024, ge=8, description="Token limit per example (as in SFT).")
    token_budget: int | None = Field(None, ge=1, description="Tokens (prompt + response, as trained) in every "
                                                              "method's SFT set; default: num_examples × the pool's "
                                                              "mean example length.")
    num_examples: int | None = Field(None, ge=1, description="Sets the default token budget; default: "
                                                              "train.steps × train.batch_size.")
    noisy_sources: list[str] | None = Field(None, description="Sources known to be noisy (corrupted, off-domain): the "
                                                              "report checks that ScaleBiO ranks them below every "
                                                              "other source (filled in from `data`).")
    partitions: list[PartitionSpec] | None = Field(
        None, description="Sources that are copies of the target corrupted at known rates: the report checks that "
                          "ScaleBiO's weight falls with the rate (filled in from `data`).")
    append_validation: bool = Field(False, description="Append the target's validation set to every method's SFT set "
                                                       "(as the ScaleBiO authors' final SFT did); the token budget "
                                                       "counts the selected pool examples only.")
    exact_match: bool = Field(True, description="Also score greedy answers (reasoning-gym scorer or string match).")
    max_new_tokens: int = Field(16, ge=1, description="Greedy decoding length of exact match.")
    less: LESSConfig = LESSConfig()
    rho: RHOConfig = RHOConfig()
    reweight: ScaleBiOMethodConfig = ScaleBiOMethodConfig()

    _unique = field_validator("sources")(unique_source_names)

    @model_validator(mode="after")
    def _variants_are_well_defined(self) -> "MixtureCompareConfig":
        if self.append_validation and any(m.endswith("_appended") for m in self.methods):
            raise ValueError("append_validation: true already appends the validation set to every method; the "
                             "*_appended methods compare with and without it (use one or the other)")
        if any(m.startswith("scalebio_at_less_cost") for m in self.methods):
            train = self.reweight.train
            if train.schedule != "constant" or train.warmup_steps or (train.warmup_steps is None
                                                                      and train.warmup_ratio):
                raise ValueError("scalebio_at_less_cost reads ScaleBiO's weights part-way through its run as a "
                                 "shorter run's: it needs reweight.train.schedule: constant and no warm-up "
                                 f"(got schedule {train.schedule!r}, warmup_ratio {train.warmup_ratio}, "
                                 f"warmup_steps {train.warmup_steps})")
        return self


class TeacherSpec(StrictModel):
    name_or_path: str = path_field(description="The teacher model (hub id, directory or alias).", resolve="if_exists")
    finetune_steps: int | None = Field(None, ge=1, description="First fine-tune it on the training conversations "
                                                                "for this many steps (a shared stage).")
    finetune_lr: float | None = Field(None, ge=0, description="Its learning rate; default: train.lr.")


class DistillCompareConfig(CalibrationBinsConfig):
    renamed_keys = {"train": "train_sources"}  # `train` is the comparison's schedule one level up

    methods: list[Literal[DISTILL_METHODS]] = Field(list(DISTILL_METHODS), min_length=1,
                                                    description="Methods to run; the first-listed is the reference "
                                                                "every other one is compared with (sft by default).")
    teacher: TeacherSpec
    train_sources: list[SourceConfig] | None = Field(None, min_length=1, description="Conversations the students learn "
                                                                              "from (filled in by demo_data).")
    validation_items: str | None = path_field(None, description="Held-out multiple-choice items: FIRST's "
                                                                 "calibration cache and the post-hoc temperature are "
                                                                 "fitted on them.")
    test_items: str | None = path_field(None, description="In-domain multiple-choice items every model is scored on.")
    ood_test_items: str | None = path_field(None, description="Out-of-domain multiple-choice items (another task "
                                                              "family) every model is also scored on.")
    max_length: int = Field(1024, ge=8, description="Token limit per training example.")
    student: StudentConfig = Field(StudentConfig(), description="Every student's init (the same for all methods).")
    k: int = Field(5, ge=1, le=64, description="Top-k of the teacher cache.")
    label_smoothing: float = Field(0.1, gt=0, lt=1, description="ε of the label-smoothing baseline.")
    calibrate: CalibrationSettings = Field(CalibrationSettings(positions="answer"),
                                           description="FIRST's calibration of the teacher on the validation items' "
                                                       "cache (answer positions by default: these are MCQ items).")
    hard_label_weight: float = Field(0.0, ge=0, le=1, description="β of every top-k method (the paper: 0).")
    mixed_hard_label_weight: float = Field(0.1, gt=0, le=1, description="β of `first_hard_labels`: FIRST with "
                                                                         "(1 − β)·KL + β·cross-entropy on the true "
                                                                         "token.")

    @field_validator("methods", mode="before")
    @classmethod
    def _renamed_methods(cls, methods):
        for name in methods if isinstance(methods, list) else []:
            if name in RENAMED_METHODS:
                raise ValueError(f"method {name!r} is now {RENAMED_METHODS[name]!r} (first and topk_kd use the other "
                                 f"bucket; the paper's restricted loss is first_restricted / topk_kd_restricted)")
        return methods


class CompareConfig(StrictModel):
    output_dir: str = path_field("compare-out", description="Everything goes here; rerun the same command to resume.")
    seeds: list[int] = Field([0], min_length=1, description="Every method runs once per seed (training order, "
                                                             "sampling, selection randomness); results are pooled "
                                                             "over seeds × test items.")
    data_seed: int = Field(0, description="Seed of the demo data and of the shared teacher stages (fixed across "
                                          "`seeds`).")
    model: ModelConfig | None = Field(None, description="The base model every mixture method fine-tunes (required "
                                                         "with a `mixture` section).")
    train: TrainConfig = Field(TrainConfig(), description="Shared by every method: batch, learning rate, schedule; "
                                                          "steps of the students (and the default mixture token "
                                                          "budget).")
    eval_batch_size: int = Field(16, ge=1, description="Examples per forward pass of every evaluation.")
    mixture: MixtureCompareConfig | None = None
    distillation: DistillCompareConfig | None = None
    data: ExperimentDataConfig | None = Field(
        None, description="Build this experiment data (task families, noise sources, sizes) under output_dir/data "
                          "and fill in every source and split path left out (docs/compare.md).")
    demo_data: Literal[DEMO_DATA] | None = Field(
        None, description="A preset `data` section (the demo's families; quick / default / evidence sizes).")

    @model_validator(mode="after")
    def _something_to_compare(self) -> "CompareConfig":
        if self.mixture is None and self.distillation is None:
            raise ValueError("nothing to compare: give a `mixture` section, a `distillation` section, or both")
        if self.mixture is not None and self.model is None:
            raise ValueError("a `mixture` comparison needs `model` (the base model each method fine-tunes)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        if self.data is not None and self.demo_data is not None:
            raise ValueError("give a `data` section or a demo_data preset, not both")
        if self.experiment_data() is None:
            for section, keys in (("mixture", ("sources", "validation", "test")),
                                  ("distillation", ("train_sources", "validation_items", "test_items"))):
                missing = [key for key in keys if getattr(self, section) is not None
                           and getattr(getattr(self, section), key) is None]
                if missing:
                    raise ValueError(f"{section} needs {', '.join(missing)} (or a `data` section, or demo_data)")
        return self

    def experiment_data(self) -> ExperimentDataConfig | None:
        """The data to build: the `data` section, or the `demo_data` preset's."""
        return self.data if self.data is not None else (PRESETS[self.demo_data]() if self.demo_data else None)
