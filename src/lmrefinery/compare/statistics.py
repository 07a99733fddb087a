"""`compare`'s numbers pooled over seeds × test items: means with 95% CIs, paired differences against the reference
method, and the four claims of the two papers checked against those intervals (evaluation/statistics.py)."""

from __future__ import annotations

import numpy as np
from scipy import stats

from lmrefinery.evaluation.calibration import expected_calibration_error
from lmrefinery.evaluation.statistics import (Estimate, mean_estimate, paired_difference, set_metric_difference,
                                              set_metric_estimate)

NLL_FLOOR = 1e-12


def _ece(n_bins: int):
    return lambda confidence, correct: expected_calibration_error(confidence, correct, n_bins)


def _per_seed(results: dict, key: str, seeds: list) -> np.ndarray:
    return np.asarray([results[seed]["per_item"][key] for seed in seeds], dtype=np.float64)


def _json(estimate: Estimate) -> dict:
    return estimate.to_json()


def _token_mean(loss_sums, tokens) -> float:
    return float(np.sum(loss_sums) / max(np.sum(tokens), 1))


def _loss_arguments(results: dict, seeds: list) -> list[tuple]:
    return [(results[seed]["per_item"]["loss_sum"], results[seed]["per_item"]["tokens"]) for seed in seeds]


def _mixture_differences(ours: dict, theirs: dict, seeds: list, keys: list[str]) -> dict:
    difference = {"test_loss": _json(set_metric_difference(_token_mean, _loss_arguments(ours, seeds),
                                                           _loss_arguments(theirs, seeds)))}
    for key in keys:
        difference[key] = _json(paired_difference(_per_seed(ours, key, seeds), _per_seed(theirs, key, seeds)))
    return difference


def mixture_statistics(results: dict, seeds: list, noisy_sources: list[str] | None,
                       partitions: list[dict] | None = None) -> dict:
    """Per method: the target's test loss (token mean over the test set, as `evaluate --task loss` reports it), the
    mean of each example's own loss, exact match — each mean [CI] — and the paired differences to the reference
    (first-listed) method; for ScaleBiO the learned weights' ordering per seed, and with `partitions` ({name, kind,
    rate}: copies of the target corrupted at known rates) the rank correlation of weight and rate per kind."""
    methods = list(results)
    reference = methods[0]
    keys = [key for key in ("example_loss", "exact_match") if key in results[reference][seeds[0]]["per_item"]]
    table = {}
    for method in methods:
        row = {"test_loss": _json(set_metric_estimate(_token_mean, _loss_arguments(results[method], seeds)))}
        row |= {key: _json(mean_estimate(_per_seed(results[method], key, seeds))) for key in keys}
        if method != reference:
            row["difference"] = _mixture_differences(results[method], results[reference], seeds, keys)
        table[method] = row
    statistics = {"reference": reference, "methods": table}
    pairs = comparison_pairs(methods)
    if pairs:
        statistics["pairs"] = {f"{ours} vs {theirs}": _mixture_differences(results[ours], results[theirs], seeds, keys)
                               for ours, theirs in pairs}
    if "scalebio" in results:
        others = [m for m in ("less", "rho") if m in results]
        statistics["scalebio_vs"] = {other: _mixture_differences(results["scalebio"], results[other], seeds, keys)
                                     for other in others}
        statistics["weights"] = _weights_ordering(results["scalebio"], seeds, noisy_sources,
                                                  [p["name"] for p in partitions or []])
        if partitions:
            statistics["partitions"] = partition_correlations(results["scalebio"], seeds, partitions)
    return statistics


def comparison_pairs(methods: list[str]) -> list[tuple[str, str]]:
    """The paired comparisons beyond "each method vs the reference" that the mixture variants exist for: each
    `<method>_appended` against its method (what appending the validation set does), ScaleBiO's appended and
    equal-compute variants against LESS-style's and RHO-style's counterparts (the same comparison with appended
    validation, and at equal selection compute)."""
    present = set(methods)
    pairs = [(name, name[:-len("_appended")]) for name in methods
             if name.endswith("_appended") and name[:-len("_appended")] in present]
    for ours, theirs in (("scalebio_appended", "less_appended"), ("scalebio_appended", "rho_appended"),
                         ("scalebio_at_less_cost", "less"), ("scalebio_at_less_cost_appended", "less_appended")):
        if ours in present and theirs in present:
            pairs.append((ours, theirs))
    return [pair for pair in pairs if pair[1] != methods[0]]  # "vs the reference" is in the table already


PARTITION_RHO = -0.8  # claim (a′): the weight falls with the corruption rate, ρ at most this in every seed


def partition_correlations(results: dict, seeds: list, partitions: list[dict]) -> dict:
    """Per seed and corruption kind: Spearman's ρ between the partitions' corruption rates and learned weights."""
    kinds = sorted({p["kind"] for p in partitions})
    per_seed = {}
    for seed in seeds:
        weights = results[seed]["learned_weights"]
        per_seed[str(seed)] = {}
        for kind in kinds:
            mine = sorted((p for p in partitions if p["kind"] == kind), key=lambda p: p["rate"])
            rho = stats.spearmanr([p["rate"] for p in mine], [weights[p["name"]] for p in mine]).statistic
            per_seed[str(seed)][kind] = {"rho": float(rho), "rates": [p["rate"] for p in mine],
                                         "weights": [weights[p["name"]] for p in mine]}
    return {"kinds": kinds, "threshold": PARTITION_RHO, "per_seed": per_seed}


def _weights_ordering(results: dict, seeds: list, noisy: list[str] | None, partitions: list[str]) -> dict:
    """Per seed: the learned weights, and whether every noisy source ends below every clean one (the corruption-rate
    partitions are neither)."""
    per_seed = {}
    for seed in seeds:
        weights = results[seed]["learned_weights"]
        row = {"weights": weights, "realised_shares": results[seed]["realised_shares"]}
        if noisy:
            clean = [w for name, w in weights.items() if name not in noisy and name not in partitions]
            row["noisy_below_clean"] = max(weights[name] for name in noisy) < min(clean)
            row["margin"] = min(clean) - max(weights[name] for name in noisy)
        per_seed[str(seed)] = row
    return {"noisy_sources": noisy, "per_seed": per_seed}


def _mcq_arrays(result: dict, test: str) -> dict:
    items = result["tests"][test]["per_item"]
    return {"correct": np.asarray(items["correct"]), "confidence": np.asarray(items["confidence"]),
            "nll": -np.log(np.clip(np.asarray(items["gold_probability"]), NLL_FLOOR, 1.0))}


def _mcq_estimates(per_seed: list[dict], n_bins: int) -> dict:
    return {"accuracy": _json(mean_estimate([s["correct"] for s in per_seed])),
            "ece": _json(set_metric_estimate(_ece(n_bins), [(s["confidence"], s["correct"]) for s in per_seed])),
            "nll": _json(mean_estimate([s["nll"] for s in per_seed]))}


def _mcq_differences(ours: list[dict], theirs: list[dict], n_bins: int) -> dict:
    return {"accuracy": _json(paired_difference([s["correct"] for s in ours], [s["correct"] for s in theirs])),
            "ece": _json(set_metric_difference(_ece(n_bins), [(s["confidence"], s["correct"]) for s in ours],
                                               [(s["confidence"], s["correct"]) for s in theirs])),
            "nll": _json(paired_difference([s["nll"] for s in ours], [s["nll"] for s in theirs]))}


def distillation_statistics(results: dict, shared: dict, seeds: list, n_bins: int) -> dict:
    """Per test set and method: accuracy, ECE and NLL (mean [CI]) and the paired differences to the reference
    (first) method; the teacher and the untrained student as fixed reference rows; the teacher's re-calibration on
    the test answer positions."""
    methods = list(results)
    reference = methods[0]
    tests = list(results[reference][seeds[0]]["tests"])
    statistics = {"reference": reference, "tests": {}}
    for test in tests:
        arrays = {method: [_mcq_arrays(results[method][seed], test) for seed in seeds] for method in methods}
        table = {}
        for method in methods:
            row = _mcq_estimates(arrays[method], n_bins)
            if method != reference:
                row["difference"] = _mcq_differences(arrays[method], arrays[reference], n_bins)
            table[method] = row
        fixed = {name: _mcq_estimates([_mcq_arrays({"tests": shared["scores"][name]}, test)], n_bins)
                 for name in ("teacher", "student_init")}
        recalibration = shared["recalibration"][test]
        correct = np.asarray(recalibration["correct"])
        before = (np.asarray(recalibration["confidence_before"]), correct)
        after = (np.asarray(recalibration["confidence_after"]), correct)
        if "first" in methods and "sft_temperature" in methods:  # distilling vs fitting one temperature
            table["first"]["versus_temperature_scaling"] = _mcq_differences(arrays["first"], arrays["sft_temperature"],
                                                                            n_bins)
        statistics["tests"][test] = {
            "methods": table, "fixed": fixed,
            **({"first_vs_temperature_scaling": table["first"]["versus_temperature_scaling"]}
               if "versus_temperature_scaling" in table.get("first", {}) else {}),
            "teacher_recalibration": {
                "ece_before": _json(set_metric_estimate(_ece(n_bins), [before])),
                "ece_after": _json(set_metric_estimate(_ece(n_bins), [after])),
                "difference": _json(set_metric_difference(_ece(n_bins), [after], [before])),
                "temperature": recalibration["temperature"], "transform": recalibration["transform"]}}
    return statistics


def claims(mixture: dict | None, distillation: dict | None) -> list[dict]:
    """The papers' claims, each with whether it held on these intervals."""
    found = []
    if mixture and "weights" in mixture and mixture["weights"]["noisy_sources"]:
        per_seed = mixture["weights"]["per_seed"]
        held = all(row["noisy_below_clean"] for row in per_seed.values())
        found.append({"claim": "a", "text": "ScaleBiO puts the corrupted and off-domain sources below every clean "
                                            "source in every seed", "held": held,
                      "evidence": {seed: round(row["margin"], 4) for seed, row in per_seed.items()}})
    if mixture and "partitions" in mixture:
        section = mixture["partitions"]
        held = all(row[kind]["rho"] <= section["threshold"] for row in section["per_seed"].values()
                   for kind in section["kinds"])
        found.append({"claim": "a′", "text": f"ScaleBiO's weight falls with the corruption rate of the target's "
                                             f"partitions (Spearman ρ ≤ {section['threshold']} for "
                                             f"{' and '.join(section['kinds'])} noise in every seed)", "held": held,
                      "evidence": {seed: {kind: round(row[kind]["rho"], 3) for kind in section["kinds"]}
                                   for seed, row in section["per_seed"].items()}})
    if mixture and "scalebio" in mixture["methods"] and mixture["reference"] != "scalebio":
        difference = mixture["methods"]["scalebio"]["difference"]["test_loss"]
        found.append({"claim": "b", "text": f"SFT on ScaleBiO's mix has a lower target test loss than the "
                                            f"{mixture['reference']} mix (paired 95% CI of the difference below 0)",
                      "held": difference["high"] < 0, "evidence": difference})
    if distillation:
        names = {"first": "FIRST's student", "first_restricted": "FIRST's student with the paper's restricted loss",
                 "first_hard_labels": "FIRST's student with a hard-label share"}
        for method, name in names.items():
            for test, section in distillation["tests"].items():
                row = section["methods"].get(method)
                if row is None or "difference" not in row:
                    continue
                ece, accuracy = row["difference"]["ece"], row["difference"]["accuracy"]
                found.append({"claim": "c", "test": test, "method": method,
                              "text": f"{name} has a lower ECE than the {distillation['reference']} student "
                                      f"({test.replace('_', '-')}; CI below 0) at an accuracy not lower beyond the CI",
                              "held": ece["high"] < 0 and accuracy["high"] >= 0,
                              "evidence": {"ece_difference": ece, "accuracy_difference": accuracy}})
        for test, section in distillation["tests"].items():
            difference = section["teacher_recalibration"]["difference"]
            found.append({"claim": "d", "test": test,
                          "text": f"the teacher's ECE falls after re-calibration (held-out {test.replace('_', '-')} "
                                  f"answer positions; CI of the change below 0)",
                          "held": difference["high"] < 0, "evidence": difference})
        headline = {test: section["methods"]["first"]["difference"] for test, section in distillation["tests"].items()
                    if "difference" in section["methods"].get("first", {})}
        if headline:
            found.append({"claim": "h", "text": f"the paper's headline: FIRST's student is more accurate *and* better "
                                                f"calibrated than the {distillation['reference']} student on every "
                                                f"test ({', '.join(t.replace('_', '-') for t in headline)}; accuracy "
                                                f"CI above 0, ECE CI below 0)",
                          "held": all(d["accuracy"]["low"] > 0 and d["ece"]["high"] < 0 for d in headline.values()),
                          "evidence": {test: {"accuracy_difference": d["accuracy"], "ece_difference": d["ece"]}
                                       for test, d in headline.items()}})
        for test, section in distillation["tests"].items():
            versus = section.get("first_vs_temperature_scaling")
            if versus is None:
                continue
            ece, accuracy = versus["ece"], versus["accuracy"]
            found.append({"claim": "e", "test": test, "method": "first",
                          "text": f"FIRST's student has a lower ECE than the SFT student with a fitted temperature "
                                  f"({test.replace('_', '-')}; CI below 0) at an accuracy not lower beyond the CI",
                          "held": ece["high"] < 0 and accuracy["high"] >= 0,
                          "evidence": {"ece_difference": ece, "accuracy_difference": accuracy,
                                       "nll_difference": versus["nll"]}})
    return found
