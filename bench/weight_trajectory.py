"""A `reweight` run's weights along the way: when (if ever) the ordering by corruption rate appears.

For each run directory: the learned weights at the chosen steps (default 30, 100, 200, 300 — whichever the run
reached), and at each step Spearman's ρ between the corruption rate of the target's partitions and their weights,
per corruption kind (partitions are the sources named `<family>_<kind>_<rate>`, as `compare` builds them), plus the
top-weighted source. With a constant schedule and no warm-up, the first N steps of a longer run are the N-step run, so
one 300-step run answers the 30 / 100 / 300-step ablation. `--plot` draws every source's weight per step.

Runs that logged `scalebio.log_alignment` also get, per window between the chosen steps, the mean, median and share of
positive steps of the alignment cos(w − u, −∇L1(w)) — whether the λ-gradient still acts as an influence estimate as
the run goes on; `--plot-alignment` draws it per step for every run given (e.g. α = 10 against α = 100).

    python bench/weight_trajectory.py results/evidence-a/mixture/mixture/scalebio/seed-*/reweight
    python bench/weight_trajectory.py RUN --plot docs/img/weights-300.png
    python bench/weight_trajectory.py RUN_A RUN_B --plot-alignment docs/img/alignment.png
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARTITION = re.compile(r"_(dot|wrong_answers)_([0-9.]+)$")


def ordering_at(weights: dict[str, float]) -> dict:
    from scipy import stats

    partitions: dict[str, list[tuple[float, float]]] = {}
    for name, weight in weights.items():
        match = PARTITION.search(name)
        if match:
            partitions.setdefault(match.group(1), []).append((float(match.group(2)), weight))
    rho = {kind: round(float(stats.spearmanr(*zip(*sorted(pairs))).statistic), 3)
           for kind, pairs in sorted(partitions.items()) if len(pairs) > 2}
    top = max(weights, key=weights.get)
    return {"spearman_rho": rho, "top_source": top, "top_weight": round(weights[top], 3)}


def alignment_per_step(run: Path) -> dict[int, float]:
    """{step: alignment} for the steps where the run logged one (None while w = u is skipped)."""
    from lmrefinery.train.run_dir import read_metrics

    return {row["step"]: row["alignment"] for row in read_metrics(run / "metrics.jsonl")
            if "event" not in row and row.get("alignment") is not None}


def alignment_windows(alignment: dict[int, float], bounds: list[int]) -> dict[str, dict]:
    """The alignment summarised over steps (previous bound, bound] — consecutive steps are correlated (w and u
    carry over), so this describes the run rather than estimating a population mean."""
    import numpy as np

    windows, start = {}, 0
    for bound in sorted(bounds):
        values = np.array([value for step, value in alignment.items() if start < step <= bound])
        if len(values):
            windows[f"{start + 1}-{bound}"] = {"steps": int(len(values)), "mean": round(float(values.mean()), 4),
                                               "median": round(float(np.median(values)), 4),
                                               "positive": round(float((values > 0).mean()), 3)}
        start = bound
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="reweight output directories")
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 100, 200, 300])
    parser.add_argument("--plot", type=Path, help="PNG of the first run's weight trajectories")
    parser.add_argument("--plot-alignment", type=Path, help="PNG of every run's alignment per step")
    args = parser.parse_args()
    from lmrefinery.recipes.reweight import weight_trajectory

    report, trajectories, alignments = {}, {}, {}
    for run in args.runs:
        trajectories[run] = trajectory = weight_trajectory(run)
        report[str(run)] = {step: ordering_at(trajectory[step]) for step in args.steps if step in trajectory}
        alignments[str(run)] = alignment = alignment_per_step(run)
        if alignment:
            report[str(run)]["alignment"] = alignment_windows(alignment, [*args.steps, max(alignment)])
    print(json.dumps(report, indent=2))
    if args.plot:
        plot_trajectories(trajectories[args.runs[0]], args.plot, args.runs[0])
    if args.plot_alignment:
        plot_alignment(alignments, args.plot_alignment)


def plot_alignment(runs: dict[str, dict[int, float]], path: Path) -> None:
    """Each run's per-step alignment, faint, with a 10-step running mean on top."""
    import matplotlib.pyplot as plt
    import numpy as np

    from lmrefinery.plots import save_figure

    figure, axes = plt.subplots(figsize=(8, 4), dpi=120)
    for index, (run, alignment) in enumerate(runs.items()):
        steps = np.array(sorted(alignment))
        values = np.array([alignment[step] for step in steps])
        colour = plt.get_cmap("tab10").colors[index % 10]
        axes.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        if len(values) >= 10:
            smooth = np.convolve(values, np.ones(10) / 10, mode="valid")
            axes.plot(steps[9:], smooth, color=colour, linewidth=2, label=f"{run} (10-step mean)")
    axes.axhline(0, color="black", linewidth=0.6)
    axes.set(title="alignment cos(w − u, −∇L1(w)) per step", xlabel="step", ylabel="cosine")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


def plot_trajectories(trajectory: dict[int, dict[str, float]], path: Path, run: Path) -> None:
    """Partitions coloured by corruption rate (solid: ".", dashed: wrong answers), the other sources in their own
    colours, the legend beside the axes."""
    import matplotlib.pyplot as plt

    from lmrefinery.plots import save_figure

    steps = sorted(trajectory)
    figure, axes = plt.subplots(figsize=(9, 4.5), dpi=120)
    rates, others = plt.get_cmap("plasma"), plt.get_cmap("tab10").colors
    for index, name in enumerate(trajectory[steps[0]]):
        values = [trajectory[step][name] for step in steps]
        match = PARTITION.search(name)
        if match:
            axes.plot(steps, values, color=rates(0.85 * float(match.group(2))), linewidth=1.2,
                      linestyle="-" if match.group(1) == "dot" else "--", label=name)
        else:
            axes.plot(steps, values, color=others[index % len(others)], linewidth=2.2, label=name)
    # a compare stage (…/<method>/seed-N/reweight) is named by its method and seed, a plain run by its directory
    parts = run.resolve().parts
    name = "/".join(parts[-6:-1]) if parts[-1] == "reweight" else "/".join(parts[-3:])
    axes.set(title=f"source weights per step — {name}",
             xlabel="step", ylabel="weight")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    save_figure(figure, path)

if __name__ == "__main__":
    main()
