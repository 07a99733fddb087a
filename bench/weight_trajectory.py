"""A `reweight` run's weights along the way: when (if ever) the ordering by corruption rate appears.

For each run directory: the learned weights at the chosen steps (default 30, 100, 200, 300 — whichever the run
reached), and at each step Spearman's ρ between the corruption rate of the target's partitions and their weights,
per corruption kind (partitions are the sources named `<family>_<kind>_<rate>`, as `compare` builds them), plus the
top-weighted source. With a constant schedule and no warm-up, the first N steps of a longer run are the N-step run, so
one 300-step run answers the 30 / 100 / 300-step ablation. `--plot` draws every source's weight per step.

    python bench/weight_trajectory.py results/evidence-a/mixture/mixture/scalebio/seed-*/reweight
    python bench/weight_trajectory.py RUN --plot docs/img/weights-300.png
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="reweight output directories")
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 100, 200, 300])
    parser.add_argument("--plot", type=Path, help="PNG of the first run's weight trajectories")
    args = parser.parse_args()
    from lmrefinery.recipes.reweight import weight_trajectory

    report = {}
    for run in args.runs:
        trajectory = weight_trajectory(run)
        report[str(run)] = {step: ordering_at(trajectory[step]) for step in args.steps if step in trajectory}
    print(json.dumps(report, indent=2))
    if args.plot:
        plot_trajectories(weight_trajectory(args.runs[0]), args.plot, args.runs[0])


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
    axes.set(title=f"source weights per step — {'/'.join(run.resolve().parts[-6:-1])}",
             xlabel="step", ylabel="weight")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    save_figure(figure, path)

if __name__ == "__main__":
    main()
