"""`lmrefinery calibrate`: choose the teacher temperature that minimises calibration error (trustworthy maximisation).

The held-out cache and its examples → `distill.temperature.search_temperature` → calibration.json and reliability
diagrams before (raw full-vocabulary top-1 probability) and after.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lmrefinery.config import CalibrateConfig, dump_config
from lmrefinery.distill.temperature import (cross_validated_search, gather_predictions, prediction_groups,
                                            score_temperature, search_temperature)
from lmrefinery.evaluation.calibration import reliability_diagram
from lmrefinery.fileio import atomic_write_json, atomic_write_text, output_directory
from lmrefinery.recipes.common import load_cache_with_data

log = logging.getLogger(__name__)
NLL_WARNING = 1.5  # warn when the ECE-chosen temperature raises NLL by half or more


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def run(config: CalibrateConfig) -> Path:
    cache, _, pool, _ = load_cache_with_data(config.cache)
    logprobs, tails, targets = gather_predictions(cache, pool.examples, config.positions)
    chosen, curve = search_temperature(logprobs, tails, targets, transform=config.transform,
                                       objective=config.objective, n_bins=config.n_bins, grid=config.grid,
                                       fine_step=config.fine_step)
    cross_validated = cross_validated_search(
        logprobs, tails, targets, prediction_groups(pool.examples, config.positions), folds=config.cv_folds,
        transform=config.transform, objective=config.objective, n_bins=config.n_bins, grid=config.grid,
        fine_step=config.fine_step)
    before = score_temperature(logprobs, tails, targets, None, 1.0, config.n_bins)
    at_one = curve.get(1.0) or score_temperature(logprobs, tails, targets, config.transform, 1.0, config.n_bins)
    objective = config.objective
    improves = chosen[objective] < before[objective]

    output_dir = output_directory(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    reliability_diagram(before["_confidence"], before["_correct"], output_dir / "plots" / "reliability-before.png",
                        config.n_bins, "Teacher as is (full-vocabulary top-1 probability)")
    reliability_diagram(chosen["_confidence"], chosen["_correct"], output_dir / "plots" / "reliability-after.png",
                        config.n_bins, f"Teacher after {config.transform}, c = {chosen['temperature']:g}")
    atomic_write_json(output_dir / "calibration.json", {
        "transform": config.transform, "objective": objective, "positions": config.positions,
        "temperature": chosen["temperature"], "improves": improves,
        "ece_before": before["ece"], "ece_after": chosen["ece"], "ece_at_temperature_1": at_one["ece"],
        # out of sample: each fold scored at the temperature searched on the others (the in-sample figure is optimistic)
        "ece_after_cross_validated": cross_validated["ece"] if cross_validated else None,
        "cross_validation": cross_validated,
        "before": _public(before), "after": _public(chosen), "at_temperature_1": _public(at_one),
        "held_out_positions": int(targets.numel()), "k": cache.k, "cache": str(config.cache),
        "curve": [_public(curve[c]) for c in sorted(curve)]})
    atomic_write_text(output_dir / "config.yaml", dump_config(config))
    log.info("temperature %.2f (%s): ECE %.4f → %.4f in sample, %s out of sample (%s-fold), %.4f at c = 1; %d "
             "positions; wrote %s", chosen["temperature"], config.transform, before["ece"], chosen["ece"],
             f"{cross_validated['ece']:.4f}" if cross_validated else "n/a",
             cross_validated["folds"] if cross_validated else "no", at_one["ece"], targets.numel(),
             output_dir / "calibration.json")
    if objective == "ece" and chosen["nll"] > NLL_WARNING * before["nll"]:
        log.warning("the chosen c = %g lowers ECE but makes the teacher's NLL much worse (%.3f → %.3f): ECE rewards a "
                    "confidence matching the accuracy, NLL punishes the true token's probability; consider "
                    "objective=nll or check the held-out data", chosen["temperature"], before["nll"], chosen["nll"])
    if not improves:
        log.warning("no temperature improves on the teacher as it is (%s %.4f untransformed, %.4f at the best c = %g): "
                    "calibration.json says so, and distill then keeps the teacher's distribution unchanged",
                    objective.upper(), before[objective], chosen[objective], chosen["temperature"])
    return output_dir
