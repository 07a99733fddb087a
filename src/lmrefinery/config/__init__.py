"""Typed configs: YAML file + dotted overrides → validated sections (loading.py), shared sections (sections.py),
one class per command (commands.py, compare.py)."""

from lmrefinery.config.commands import (CalibrateConfig, CalibrationReportConfig, DemoConfig, DistillConfig,
                                        DistillLossConfig, EvaluateConfig, ExactMatchEvaluateConfig,
                                        LMEvalEvaluateConfig, LossEvaluateConfig, MCQEvaluateConfig, MixConfig,
                                        ReweightConfig, ReweightTrainConfig, ScaleBiOConfig, SFTConfig, StudentConfig,
                                        TeacherConfig)
from lmrefinery.config.compare import CompareConfig
from lmrefinery.config.loading import StrictModel, apply_override, dump_config, load_config, validate_config
from lmrefinery.config.sections import (CalibrationSettings, ComputeConfig, DataConfig, LISAConfig, LoRAConfig,
                                        ModelConfig,
                                        OptimizerConfig, RunConfig, SamplingConfig, ScheduleConfig, SourceConfig,
                                        SourceListConfig, SourcesConfig, TrackingConfig, TrainConfig,
                                        ValidationConfig, unique_source_names)

__all__ = ["apply_override", "CalibrateConfig", "CalibrationReportConfig", "CalibrationSettings", "CompareConfig",
           "ComputeConfig", "DataConfig", "DemoConfig", "DistillConfig", "DistillLossConfig", "dump_config",
           "EvaluateConfig", "ExactMatchEvaluateConfig", "LISAConfig", "LMEvalEvaluateConfig", "load_config",
           "LoRAConfig",
           "LossEvaluateConfig", "MCQEvaluateConfig", "MixConfig", "ModelConfig", "OptimizerConfig", "ReweightConfig",
           "ReweightTrainConfig", "RunConfig", "SamplingConfig", "ScaleBiOConfig", "ScheduleConfig", "SFTConfig",
           "SourceConfig", "SourceListConfig", "SourcesConfig", "StrictModel", "StudentConfig", "TeacherConfig",
           "TrackingConfig", "TrainConfig", "unique_source_names", "validate_config", "ValidationConfig"]
