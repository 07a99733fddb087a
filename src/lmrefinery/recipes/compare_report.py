"""`compare`'s outputs: results.json (every method's numbers), results.md (tables) and plots/compare-*.png."""

from __future__ import annotations

import math
from pathlib import Path

from lmrefinery.fileio import atomic_write_json, atomic_write_text
from lmrefinery.plots import bar_panels

# (column title, result key, format)
MIXTURE_COLUMNS = [("test loss", "test_loss", ".4f"), ("exact match", "exact_match", ".3f"),
                   ("token accuracy", "token_accuracy", ".3f"), ("token ECE", "token_ece", ".4f"),
                   ("token Brier", "token_brier", ".4f"), ("SFT examples", "sft_examples", "d"),
                   ("SFT steps", "sft_steps", "d"), ("SFT tokens", "sft_tokens", "d")]
DISTILLATION_COLUMNS = [("accuracy", "accuracy", ".3f"), ("ECE", "ece", ".4f"), ("Brier", "brier", ".4f"),
                        ("NLL", "nll", ".4f"), ("option accuracy", "option_accuracy", ".3f"),
                        ("option ECE", "option_ece", ".4f")]
COST_COLUMNS = [("wall time (s)", "wall_s", ".1f"), ("peak memory (GiB)", "peak_memory_gib", ".2f")]
MIXTURE_PLOT = {"test loss ↓": "test_loss", "exact match ↑": "exact_match", "token ECE ↓": "token_ece"}
DISTILLATION_PLOT = {"accuracy ↑": "accuracy", "ECE ↓": "ece", "Brier ↓": "brier"}


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, fmt)


def _table(results: dict, columns: list) -> list[str]:
    columns = columns + COST_COLUMNS
    lines = ["| method | " + " | ".join(title for title, _, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for method, result in results.items():
        row = result | {"peak_memory_gib": result["peak_memory_bytes"] / 2**30}
        lines.append(f"| {method} | " + " | ".join(_cell(row.get(key), fmt) for _, key, fmt in columns) + " |")
    return lines


def _selection_table(results: dict) -> list[str]:
    sources = next(iter(results.values()))["examples_per_source"]
    lines = ["| method | " + " | ".join(sources) + " |", "|---|" + "---:|" * len(sources)]
    for method, result in results.items():
        lines.append(f"| {method} | " + " | ".join(str(result["examples_per_source"].get(s, 0)) for s in sources)
                     + " |")
    return lines


def _plot(path: Path, results: dict, panels: dict, title: str) -> None:
    bar_panels(path, list(results), {label: [float(r.get(key) if r.get(key) is not None else math.nan)
                                             for r in results.values()] for label, key in panels.items()}, title)


def write_report(out: Path, config, results: dict) -> str:
    budget = config.train
    title = config.model.name_or_path if config.model is not None else config.distillation.teacher.name_or_path
    lines = [f"# lmrefinery compare — {title}", "",
             f"Every method: seed {config.seed}, batch {budget.batch_size}, lr {budget.lr:g} ({budget.schedule}). "
             "Wall time and peak memory are each method's own process (peak memory: resident set on CPU, allocated "
             "memory on a GPU).", ""]
    if results["mixture"]:
        mixture = results["mixture"]
        budget_tokens = next(iter(mixture.values()))["token_budget"]
        lines += ["## Data mixture and selection", "",
                  f"Every method's SFT set holds at most {budget_tokens} tokens (prompt + response), in whole batches "
                  f"of {budget.batch_size}; SFT makes one pass over it (so the steps differ with example lengths).", "",
                  *_table(mixture, MIXTURE_COLUMNS), "",
                  "Examples per source in each method's SFT set:", "", *_selection_table(mixture), "",
                  "![mixture methods](plots/compare-mixture.png)", ""]
        _plot(out / "plots" / "compare-mixture.png", mixture, MIXTURE_PLOT, "Data mixture / selection")
    if results["distillation"]:
        distillation = results["distillation"]
        lines += ["## Distillation", "",
                  f"Every student: the same init, the same data, {budget.steps} optimizer steps.", "",
                  *_table(distillation, DISTILLATION_COLUMNS), "",
                  "Accuracy, ECE, Brier and NLL are the full-vocabulary view (the top-1 next token must be the gold "
                  "letter); the option columns renormalise over the option letters.", ""]
        if distillation.get("sft_temperature", {}).get("reuses_sft_model"):
            lines += ["sft_temperature reuses the sft method's model: its wall time is the temperature fit and the "
                      "evaluation only.", ""]
        shared = results["shared"]["timings_s"]
        if shared:
            lines += ["Shared stages (run once, not in any method's wall time): "
                      + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in shared.items()) + ".", ""]
        lines += ["![distillation methods](plots/compare-distillation.png)", ""]
        _plot(out / "plots" / "compare-distillation.png", distillation, DISTILLATION_PLOT, "Distillation")
    text = "\n".join(lines)
    atomic_write_text(out / "results.md", text)
    atomic_write_json(out / "results.json", {"model": title, "seed": config.seed,
                                             "budget": budget.model_dump(mode="json"), **results})
    return text
