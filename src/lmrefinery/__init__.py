"""lmrefinery: refine a fine-tuned LLM's data mixture (ScaleBiO + LISA) and trustworthiness (FIRST).

The algorithms are importable as Python objects (docs/api.md); they load lazily, so `import lmrefinery` stays cheap:

    from lmrefinery import ScaleBiO, LISA, LISACallback                       # data reweighting, layerwise AdamW
    from lmrefinery import topk_kl_loss, teacher_distribution, search_temperature, TeacherCache   # FIRST
    from lmrefinery import expected_calibration_error, ...                     # calibration metrics
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ScaleBiO": "lmrefinery.scalebio",
    "LISA": "lmrefinery.lisa",
    "LISACallback": "lmrefinery.lisa",
    "topk_kl_loss": "lmrefinery.distill.losses",
    "teacher_distribution": "lmrefinery.distill.losses",
    "search_temperature": "lmrefinery.distill.temperature",
    "TeacherCache": "lmrefinery.distill.cache",
    "expected_calibration_error": "lmrefinery.evaluation.calibration",
    "equal_mass_calibration_error": "lmrefinery.evaluation.calibration",
    "maximum_calibration_error": "lmrefinery.evaluation.calibration",
    "brier_score": "lmrefinery.evaluation.calibration",
    "negative_log_likelihood": "lmrefinery.evaluation.calibration",
    "selective_accuracy": "lmrefinery.evaluation.calibration",
    "coverage_accuracy_auc": "lmrefinery.evaluation.calibration",
    "reliability_diagram": "lmrefinery.evaluation.calibration",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmrefinery' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
