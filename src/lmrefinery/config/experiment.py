"""`compare`'s experiment data as configuration: which task families make the target, the clean sources, the noise
sources and the multiple-choice tests, how large each split is — built offline under output_dir/data
(compare/data.py), so a user picks any reasoning-gym family set without editing code. The `demo_data` presets are
instances of it (PRESETS)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lmrefinery.config.loading import StrictModel
from lmrefinery.config.sections import check_unique

NOISE_KINDS = ("dot", "wrong_answers", "off_domain")


def known_family(name: str) -> str:
    """A reasoning-gym task family, checked against its registry (when the package is installed: the build needs
    it anyway, and says so)."""
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError:
        return name
    if name not in DATASETS:
        close = sorted(n for n in DATASETS if n.startswith(name[:4]))[:5]
        similar = f" (similar: {', '.join(close)})" if close else ""
        raise ValueError(f"unknown reasoning-gym family {name!r}{similar}")
    return name


class FamilyConfig(StrictModel):
    """A reasoning-gym task family and its generator settings."""

    family: str = Field(description="reasoning-gym task name, e.g. basic_arithmetic, chain_sum, leg_counting.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Generator settings passed to reasoning-gym, "
                                                                       "e.g. {max_digits: 1}.")
    name: str | None = Field(None, description="Source name in outputs; default: the family.")

    _known = field_validator("family")(classmethod(lambda cls, value: known_family(value)))

    @property
    def source_name(self) -> str:
        return self.name or self.family


class NoiseSourceConfig(StrictModel):
    """A source the reweighting should push down."""

    kind: Literal[NOISE_KINDS] = Field(description="'dot': a copy of a family whose answers are replaced by '.'; "
                                                   "'wrong_answers': a copy whose answers are permuted among its "
                                                   "questions (a derangement: every answer wrong but well-formed); "
                                                   "'off_domain': King James Bible text as continuation tasks.")
    family: str | None = Field(None, description="dot / wrong_answers: the family copied (default: the target's).")
    rate: float = Field(1.0, ge=0, le=1, description="dot / wrong_answers: share of the copy's records corrupted.")
    name: str | None = Field(None, description="Source name; default: <family>_<kind> (or kjv_text).")

    _known = field_validator("family")(classmethod(lambda cls, value: value if value is None else known_family(value)))

    @model_validator(mode="after")
    def _family_only_for_copies(self) -> "NoiseSourceConfig":
        if self.kind == "off_domain" and self.family is not None:
            raise ValueError("an off_domain source is text, not a copy of a family: leave out `family`")
        return self


class NoisePartitionsConfig(StrictModel):
    """The ScaleBiO paper's own check: copies of the target family corrupted at increasing rates; the learned weight
    should fall with the rate (claim (a′))."""

    kinds: list[Literal["dot", "wrong_answers"]] = Field(["dot", "wrong_answers"], min_length=1,
                                                         description="Corruptions, each at every rate.")
    rates: list[float] = Field([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], min_length=3,
                               description="Corruption rates, one partition each (per kind).")
    per_partition: int = Field(64, ge=4, description="Examples per partition.")

    @field_validator("rates")
    @classmethod
    def _rates_in_range(cls, rates: list[float]) -> list[float]:
        wrong = [r for r in rates if not 0 <= r <= 1]
        if wrong or len(set(rates)) != len(rates):
            raise ValueError(f"rates must be distinct values in [0, 1], got {rates}")
        return rates


class MixtureDataConfig(StrictModel):
    target: FamilyConfig = Field(description="The family the validation and test sets come from.")
    clean: list[FamilyConfig] = Field(default_factory=list, description="Other clean families in the pool (the "
                                                                        "target's own clean copy is always there).")
    noise: list[NoiseSourceConfig] = Field(default_factory=list, description="Noise sources in the pool (claim (a)).")
    partitions: NoisePartitionsConfig | None = Field(None, description="Corruption-rate partitions of the target "
                                                                       "(claim (a′)).")
    per_source: int = Field(64, ge=1, description="Examples per clean or noise source.")
    validation: int = Field(32, ge=1, description="Target validation examples.")
    test: int = Field(256, ge=1, description="Target test examples.")

    @model_validator(mode="after")
    def _unique_names(self) -> "MixtureDataConfig":
        check_unique([self.target.source_name] + [f.source_name for f in self.clean]
                     + [noise_name(n, self.target) for n in self.noise], " (give `name`)")
        return self


def noise_name(noise: NoiseSourceConfig, target: FamilyConfig) -> str:
    if noise.name:
        return noise.name
    if noise.kind == "off_domain":
        return "kjv_text"
    return f"{noise.family or target.family}_{'corrupted' if noise.kind == 'dot' else 'wrong_answers'}"


class MCQDataConfig(StrictModel):
    in_domain: FamilyConfig = Field(description="Family of the training, held-out and in-domain test items.")
    out_of_domain: FamilyConfig | None = Field(None, description="Family of the out-of-domain test items.")
    train: int = Field(800, ge=1, description="Training items (the teacher's and the students' data).")
    heldout: int = Field(200, ge=1, description="Held-out items (calibration, temperature scaling).")
    test: int = Field(400, ge=1, description="In-domain test items.")
    ood_test: int = Field(200, ge=1, description="Out-of-domain test items.")


class ExperimentDataConfig(StrictModel):
    mixture: MixtureDataConfig | None = Field(None, description="The data-mixture experiment's sources and splits.")
    mcq: MCQDataConfig | None = Field(None, description="The distillation experiment's multiple-choice items.")


# Small numbers keep the arithmetic families within reach of a 135M model, so accuracy can move in a few steps.
_ONE_DIGIT = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
_SHORT_CHAIN = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}


def _preset(per_source: int, validation: int, test: int, mcq: tuple[int, int, int, int]) -> ExperimentDataConfig:
    target = FamilyConfig(family="basic_arithmetic", settings=_ONE_DIGIT)
    return ExperimentDataConfig(
        mixture=MixtureDataConfig(
            target=target,
            clean=[FamilyConfig(family="chain_sum", settings=_SHORT_CHAIN), FamilyConfig(family="leg_counting"),
                   FamilyConfig(family="family_relationships"), FamilyConfig(family="syllogism")],
            noise=[NoiseSourceConfig(kind="dot"), NoiseSourceConfig(kind="off_domain")],
            per_source=per_source, validation=validation, test=test),
        mcq=MCQDataConfig(in_domain=target, out_of_domain=FamilyConfig(family="chain_sum", settings=_SHORT_CHAIN),
                          train=mcq[0], heldout=mcq[1], test=mcq[2], ood_test=mcq[3]))


# The evidence sizes are those the claims need: a target test set of ≥ 256 examples, ≥ 400 in-domain and ≥ 200
# out-of-domain multiple-choice test items.
PRESETS = {"quick": lambda: _preset(16, 8, 16, (32, 16, 16, 16)),
           "default": lambda: _preset(32, 16, 64, (96, 48, 96, 48)),
           "evidence": lambda: _preset(64, 32, 256, (800, 200, 400, 200))}
