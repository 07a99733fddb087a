"""`compare`'s outputs: results.json (per-seed rows, statistics, claims), results.md (tables with 95% CIs, the
claims in plain words) and plots/compare-*.png (bars with CIs)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from lmrefinery.compare.statistics import claims, distillation_statistics, mixture_statistics
from lmrefinery.environment import describe, summary_line
from lmrefinery.fileio import atomic_write_json, atomic_write_text
from lmrefinery.plots import bar_panels

TEST_NAMES = {"in_domain": "in-domain", "out_of_domain": "out-of-domain"}


def _ci(estimate: dict, spec: str = ".4f") -> str:
    if estimate is None or not math.isfinite(estimate["value"]):
        return "—"
    text = f"{estimate['value']:{spec}}"
    if math.isfinite(estimate["low"]):
        text += f" [{estimate['low']:{spec}}, {estimate['high']:{spec}}]"
    return text


def _delta(estimate: dict | None, spec: str = "+.4f") -> str:
    if estimate is None:
        return "(reference)"
    mark = " **\\***" if estimate["excludes_zero"] else ""
    return f"{estimate['value']:{spec}} [{estimate['low']:{spec}}, {estimate['high']:{spec}}]{mark}"


def _optional(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else f"{value:{spec}}"


def _mean(rows: list[dict], key: str):
    values = [row[key] for row in rows if row.get(key) is not None]
    return sum(values) / len(values) if values else None


def _cost(rows: list[dict]) -> str:
    wall, memory = _mean(rows, "wall_s"), _mean(rows, "peak_memory_bytes")
    return f"{wall:.0f} | " + ("n/a" if memory is None else f"{memory / 2**30:.2f}")


def _strip(result: dict) -> dict:
    """A per-seed row for results.json: everything but the per-item arrays (they stay in each result.json)."""
    if isinstance(result, dict):
        return {k: _strip(v) for k, v in result.items() if k != "per_item"}
    return result


def _cost_table(results: dict, seeds: list) -> list[str]:
    """Each method's total cost: choosing its SFT set plus the SFT itself, in example-level passes and wall time."""
    rows = {method: [results[method][seed]["cost"] for seed in seeds if "cost" in results[method][seed]]
            for method in results}
    if not all(rows.values()):
        return []
    lines = ["Cost of each method (mean per seed): choosing the SFT set, then the SFT itself, in example-level forward "
             "and backward passes and wall time. Reading the table at equal total compute: a method whose selection "
             "costs as much as its SFT has spent twice the uniform mix's budget.", "",
             "| method | selection fwd / bwd | selection (s) | SFT fwd / bwd | SFT (s) | total fwd / bwd | total (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for method, costs in rows.items():
        cells = []
        for part in ("selection", "sft", "total"):
            forward = sum(c[part]["forward"] for c in costs) / len(costs)
            backward = sum(c[part]["backward"] for c in costs) / len(costs)
            wall = sum(c[part]["wall_s"] for c in costs) / len(costs)
            cells += [f"{forward:.0f} / {backward:.0f}", f"{wall:.0f}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + [""]


def _mixture_section(results: dict, statistics: dict, seeds: list) -> list[str]:
    reference = statistics["reference"]
    reference_run = results[reference][seeds[0]]
    has_exact = "exact_match" in reference_run["per_item"]
    head = "| method | test loss [95% CI] | Δ vs " + reference + " | per-example loss | Δ | " + (
        "exact match | Δ exact match | " if has_exact else "") + "SFT examples | steps | tokens | wall (s) | peak GiB |"
    lines = ["## Data mixture and selection", "",
             f"Every method's SFT set holds at most {reference_run['token_budget']} tokens (prompt + response) in "
             f"whole batches; SFT makes one pass over it. Test loss is the token-mean loss over the "
             f"{len(reference_run['per_item']['tokens'])} test examples' answer tokens (as `evaluate --task loss` "
             "reports it); "
             "per-example loss is the mean of each example's own token-mean loss. Δ is the paired difference to "
             f"`{reference}` (the same test examples under the same seeds), 95% CI by resampling test examples; "
             "**\\*** marks a CI that excludes 0.", "",
             head, "|---|" + "---:|" * (head.count("|") - 2)]
    for method, row in statistics["methods"].items():
        rows = [results[method][seed] for seed in seeds]
        difference = row.get("difference", {})
        cells = [_ci(row["test_loss"]), _delta(difference.get("test_loss")), _ci(row["example_loss"]),
                 _delta(difference.get("example_loss"))]
        if has_exact:
            cells += [_ci(row["exact_match"], ".3f"), _delta(difference.get("exact_match"), "+.3f")]
        cells += [f"{_mean(rows, 'sft_examples'):.0f}", f"{_mean(rows, 'sft_steps'):.1f}",
                  f"{_mean(rows, 'sft_tokens'):.0f}", _cost(rows)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [""] + _cost_table(results, seeds)
    if "scalebio_vs" in statistics and statistics["scalebio_vs"]:
        lines += ["ScaleBiO against the selection baselines (paired, test loss): " + "; ".join(
            f"vs {other} {_delta(values['test_loss'])}" for other, values in statistics["scalebio_vs"].items()) + ".",
            ""]
    if statistics.get("pairs"):
        lines += ["Paired comparisons between the variants (test loss" + ("; exact match" if has_exact else "") +
                  "), the same seeds and test examples: " + "; ".join(
                      f"{pair} {_delta(values['test_loss'])}" + (
                          f" / {_delta(values.get('exact_match'), '+.3f')}" if has_exact else "")
                      for pair, values in statistics["pairs"].items()) + ".", ""]
    if "weights" in statistics:
        per_seed = statistics["weights"]["per_seed"]
        names = list(next(iter(per_seed.values()))["weights"])
        lines += ["Learned ScaleBiO weights and the shares of each source in the SFT set drawn from them (learned / "
                  "realised), per seed:", "", "| source | " + " | ".join(f"seed {s}" for s in per_seed) + " |",
                  "|---|" + "---:|" * len(per_seed)]
        for name in names:
            lines.append(f"| {name} | " + " | ".join(f"{row['weights'][name]:.3f} / {row['realised_shares'][name]:.3f}"
                                                      for row in per_seed.values()) + " |")
        lines.append("")
    if "partitions" in statistics:
        section = statistics["partitions"]
        lines += ["ScaleBiO's weights of the target's corruption-rate partitions, per seed and kind (rate: weight), "
                  "and Spearman's ρ:", ""]
        for seed, row in section["per_seed"].items():
            for kind in section["kinds"]:
                pairs = ", ".join(f"{rate:g}: {weight:.3f}" for rate, weight in zip(row[kind]["rates"],
                                                                                    row[kind]["weights"]))
                lines.append(f"- seed {seed}, {kind}: {pairs} — ρ = {row[kind]['rho']:+.3f}")
        lines.append("")
    lines += ["Examples per source in each method's SFT set (seed " + str(seeds[0]) + "):", "",
              "| method | " + " | ".join(reference_run["examples_per_source"]) + " |",
              "|---|" + "---:|" * len(reference_run["examples_per_source"])]
    for method in results:
        counts = results[method][seeds[0]]["examples_per_source"]
        names = reference_run["examples_per_source"]
        lines.append(f"| {method} | " + " | ".join(str(counts[name]) for name in names) + " |")
    return lines + ["", "![mixture methods](plots/compare-mixture.png)", ""]


def _distillation_section(results: dict, statistics: dict, shared: dict, seeds: list) -> list[str]:
    reference = statistics["reference"]
    lines = ["## Distillation", "",
             "Accuracy, ECE (10 equal-width bins) and NLL use the top-1 next token over the full vocabulary and its "
             "probability (the paper's definition). Δ is the paired difference to `" + reference + "` per (seed, "
             "item) — for ECE the metric is recomputed on each resample of the items; **\\*** marks a CI that "
             "excludes 0. The teacher and the untrained student are scored once.", ""]
    calibration = shared["calibration_summary"]
    lines += [f"FIRST's calibration (shared by every FIRST variant): {calibration['transform']}, c = "
              f"{calibration['temperature']:g}, fitted on the validation items' {calibration['positions']} positions "
              f"(ECE {calibration['ece_before']:.4f} as is → {calibration['ece_after']:.4f} on those items, "
              f"{_optional(calibration.get('ece_after_cross_validated'))} out of sample, cross-validated)"
              + ("." if calibration["improves"] else "; no c improved on the teacher as it is, so FIRST distils "
                                                      "from the unchanged teacher."), ""]
    for test, section in statistics["tests"].items():
        items = len(next(iter(results.values()))[seeds[0]]["tests"][test]["per_item"]["correct"])
        lines += [f"### {TEST_NAMES.get(test, test)} test ({items} items)",
                  "", "| model | accuracy [95% CI] | Δ accuracy | ECE [95% CI] | Δ ECE | NLL | Δ NLL | student top-k "
                  "mass | wall (s) | peak GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, row in section["fixed"].items():
            lines.append(f"| {name.replace('_', ' ')} | {_ci(row['accuracy'], '.3f')} | | {_ci(row['ece'])} | | "
                         f"{_ci(row['nll'], '.3f')} | | | | |")
        for method, row in section["methods"].items():
            rows = [results[method][seed] for seed in seeds]
            difference = row.get("difference", {})
            mass = _mean(rows, "student_topk_mass")
            lines.append(f"| {method} | {_ci(row['accuracy'], '.3f')} | {_delta(difference.get('accuracy'), '+.3f')} "
                         f"| {_ci(row['ece'])} | {_delta(difference.get('ece'))} | {_ci(row['nll'], '.3f')} | "
                         f"{_delta(difference.get('nll'), '+.3f')} | {'—' if mass is None else f'{mass:.3f}'} | "
                         f"{_cost(rows)} |")
        recalibration = section["teacher_recalibration"]
        lines += ["", f"Teacher re-calibration at the answer positions of this test (c fitted on the validation "
                      f"items): ECE {_ci(recalibration['ece_before'])} as is → {_ci(recalibration['ece_after'])} "
                      f"after; change {_delta(recalibration['difference'])}.", ""]
        if "first_vs_temperature_scaling" in section:
            lines += _versus_temperature_scaling(section["first_vs_temperature_scaling"], results, shared, seeds)
    timings = shared["timings_s"]
    lines += ["Shared stages (run once, in no method's wall time): "
              + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings.items()) + ".", "",
              "![distillation methods](plots/compare-distillation.png)", ""]
    return lines


def _versus_temperature_scaling(versus: dict, results: dict, shared: dict, seeds: list) -> list[str]:
    """FIRST against the cheapest calibration fix: the SFT student with one fitted temperature, and what each costs."""
    teacher_stages = sum(shared["timings_s"].values())
    first_wall = _mean([results["first"][seed] for seed in seeds], "wall_s")
    sft_wall = _mean([results["sft"][seed] for seed in seeds], "wall_s") if "sft" in results else None
    fit_wall = _mean([results["sft_temperature"][seed] for seed in seeds], "wall_s")
    sft_cost = f"{sft_wall:.0f} s of SFT + " if sft_wall is not None else ""
    return [f"`first` − `sft_temperature` (FIRST against SFT + temperature scaling): Δ accuracy "
            f"{_delta(versus['accuracy'], '+.3f')}, Δ ECE {_delta(versus['ece'])}, Δ NLL "
            f"{_delta(versus['nll'], '+.3f')}. "
            f"Cost per seed: FIRST {first_wall:.0f} s of distillation after {teacher_stages:.0f} s of shared teacher "
            f"stages (fine-tuning, caches, calibration, evaluation); temperature scaling {sft_cost}{fit_wall:.0f} s "
            f"to fit and score one temperature.", ""]


def _claims_section(found: list[dict]) -> list[str]:
    lines = ["## The papers' claims on this run", ""]
    for claim in found:
        verdict = "**held**" if claim["held"] else "**did not hold**"
        evidence = claim["evidence"]
        if isinstance(evidence, dict) and "value" in evidence:
            detail = f"difference {_delta(evidence)}"
        elif isinstance(evidence, dict) and "ece_difference" in evidence:
            detail = (f"Δ ECE {_delta(evidence['ece_difference'])}, Δ accuracy "
                      f"{_delta(evidence['accuracy_difference'], '+.3f')}"
                      + (f", Δ NLL {_delta(evidence['nll_difference'], '+.3f')}" if "nll_difference" in evidence
                         else ""))
        elif claim["claim"] == "h":
            detail = "; ".join(f"{test.replace('_', '-')}: Δ accuracy {_delta(row['accuracy_difference'], '+.3f')}, "
                               f"Δ ECE {_delta(row['ece_difference'])}" for test, row in evidence.items())
        elif claim["claim"] == "a′":
            detail = "Spearman ρ of weight and corruption rate per seed: " + "; ".join(
                f"{seed}: " + ", ".join(f"{kind} {rho:+.3f}" for kind, rho in row.items())
                for seed, row in evidence.items())
        else:
            detail = "margin (lowest clean − highest noisy weight) per seed: " + ", ".join(
                f"{seed}: {margin:+.4f}" for seed, margin in evidence.items())
        lines.append(f"- ({claim['claim']}) {claim['text']}: {verdict} — {detail}.")
    return lines + [""]


def _plots(out: Path, mixture: dict | None, distillation: dict | None) -> None:
    triple = lambda e: (e["value"], e["low"], e["high"])  # noqa: E731
    if mixture:
        methods = list(mixture["methods"])
        panels = {"test loss ↓": [triple(row["test_loss"]) for row in mixture["methods"].values()]}
        if "exact_match" in mixture["methods"][methods[0]]:
            panels["exact match ↑"] = [triple(row["exact_match"]) for row in mixture["methods"].values()]
        bar_panels(out / "plots" / "compare-mixture.png", methods, panels, "Data mixture / selection (95% CI)")
    if distillation:
        panels = {}
        for test, section in distillation["tests"].items():
            label = TEST_NAMES.get(test, test)
            panels[f"accuracy ↑ ({label})"] = [triple(row["accuracy"]) for row in section["methods"].values()]
            panels[f"ECE ↓ ({label})"] = [triple(row["ece"]) for row in section["methods"].values()]
        methods = list(next(iter(distillation["tests"].values()))["methods"])
        bar_panels(out / "plots" / "compare-distillation.png", methods, panels, "Distillation (95% CI)")


def _environment_lines(results: dict, environment: dict) -> list[str]:
    """Where the units ran, counted by environment: bf16 results of one config differ between machines beyond their
    last digits, so a report assembled from units run on several machines says so."""
    units = [row for section in ("mixture", "distillation") for rows in (results[section] or {}).values()
             for row in rows.values()]
    units += [results["shared"]] if results["shared"] else []
    counts = Counter(summary_line(unit["environment"]) if "environment" in unit else "not recorded"
                     for unit in units)
    here = summary_line(environment)
    lines = [f"Environment of the invocation that wrote this report: {here}."]
    if set(counts) == {here}:
        return lines + ["", f"Every unit ({len(units)}: each method and seed, and the shared stages) ran there too."]
    lines += ["", f"The {len(units)} units (each method and seed, and the shared stages) ran on "
              f"{len(counts)} different environments; compare their results with that in mind:", ""]
    return lines + [f"- {count} on {line}" for line, count in counts.most_common()]


def write_report(out: Path, config, results: dict, wall_s: float, isolated: bool = True) -> str:
    seeds = list(config.seeds)
    mixture = distillation = None
    if results["mixture"]:
        mixture = mixture_statistics(results["mixture"], seeds, config.mixture.noisy_sources,
                                     [p.model_dump() for p in config.mixture.partitions or []])
    if results["distillation"]:
        distillation = distillation_statistics(results["distillation"], results["shared"], seeds,
                                               config.distillation.n_bins)
    found = claims(mixture, distillation)
    budget = config.train
    title = config.model.name_or_path if config.model is not None else config.distillation.teacher.name_or_path
    environment = describe()
    lines = [f"# lmrefinery compare — {title}", "",
             f"Seeds {seeds} (every method once per seed), batch {budget.batch_size}, lr {budget.lr:g} "
             f"({budget.schedule}), {budget.steps} steps for every student. "
             + ("Wall time and peak memory are each method's own process (mean over seeds; peak memory: resident set "
                "on CPU, allocated memory on a GPU). " if isolated else
                "The methods ran one after another in one process: wall time is each method's own (mean over "
                "seeds), peak memory is not measured (n/a). ")
             + f"This invocation took {wall_s:.0f} s (finished methods are read back, not rerun).", "",
             *_environment_lines(results, environment), ""]
    if found:
        lines += _claims_section(found)
    if mixture:
        lines += _mixture_section(results["mixture"], mixture, seeds)
    if distillation:
        lines += _distillation_section(results["distillation"], distillation, results["shared"], seeds)
    _plots(out, mixture, distillation)
    text = "\n".join(lines)
    atomic_write_text(out / "results.md", text)
    atomic_write_json(out / "results.json", {
        "model": title, "seeds": seeds, "budget": budget.model_dump(mode="json"), "environment": environment,
        "claims": found,
        "statistics": {"mixture": mixture, "distillation": distillation},
        "per_seed": {section: {method: {str(seed): _strip(row) for seed, row in rows.items()}
                               for method, rows in (results[section] or {}).items()}
                     for section in ("mixture", "distillation")},
        "shared": _strip(results["shared"])})
    return text
