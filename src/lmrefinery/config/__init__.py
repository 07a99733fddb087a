"""Typed configs: YAML file + dotted overrides → validated sections (loading.py), shared sections (sections.py),
one class per command (commands.py, compare.py)."""

from lmrefinery.config.commands import (CalibrateConfig, CalibrationReportConfig, DemoConfig, DistillConfig,
                                        DistillLossConfig, EvaluateConfig, ExactMatchEvaluateConfig, LisaOrLoraConfig,
                                        LMEvalEvaluateConfig, LossEvaluateConfig, MCQEvaluateConfig, MixConfig,
                                        ReweightConfig, ReweightTrainConfig, ScaleBiOConfig, SFTConfig, StudentConfig,
                                        SupervisedRunConfig, TeacherConfig)
from lmrefinery.config.compare import CompareConfig
from lmrefinery.config.loading import StrictModel, apply_override, dump_config, load_config, validate_config
from lmrefinery.config.sections import (CalibrationBinsConfig, CalibrationSettings, ComputeConfig,
                                        ConversationSourcesConfig, DataConfig, LISAConfig, LoRAConfig, ModelConfig,
                                        OptimizerConfig, RecordSourcesConfig, ResumableConfig, RunConfig,
                                        SamplingConfig, ScheduleConfig, SourceConfig, TrackingConfig, TrainConfig,
                                        ValidationConfig, unique_source_names)

__all__ = ["apply_override", "CalibrateConfig", "CalibrationBinsConfig", "CalibrationReportConfig",
           "CalibrationSettings", "CompareConfig", "ComputeConfig", "ConversationSourcesConfig", "DataConfig",
           "DemoConfig", "DistillConfig", "DistillLossConfig", "dump_config", "EvaluateConfig",
           "ExactMatchEvaluateConfig", "LISAConfig", "LisaOrLoraConfig", "LMEvalEvaluateConfig", "load_config",
           "LoRAConfig", "LossEvaluateConfig", "MCQEvaluateConfig", "MixConfig", "ModelConfig", "OptimizerConfig",
           "RecordSourcesConfig", "ResumableConfig", "ReweightConfig", "ReweightTrainConfig", "RunConfig",
           "SamplingConfig",
           "ScaleBiOConfig", "ScheduleConfig", "SFTConfig", "SourceConfig", "StrictModel", "StudentConfig",
           "SupervisedRunConfig", "TeacherConfig", "TrackingConfig", "TrainConfig", "unique_source_names",
           "validate_config", "ValidationConfig"]
