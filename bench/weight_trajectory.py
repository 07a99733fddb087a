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


def weights_per_step(run: Path) -> dict[int, dict[str, float]]:
    from lmrefinery.train.run_dir import read_metrics

    return {m["step"]: m["weights"] for m in read_metrics(run / "metrics.jsonl") if "weights" in m}


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
    report = {}
    for run in args.runs:
        trajectory = weights_per_step(run)
        report[str(run)] = {step: ordering_at(trajectory[step]) for step in args.steps if step in trajectory}
    print(json.dumps(report, indent=2))
    if args.plot:
        from lmrefinery.plots import line_plot

        trajectory = weights_per_step(args.runs[0])
        steps = sorted(trajectory)
        line_plot(args.plot, steps, {name: [trajectory[s][name] for s in steps] for name in trajectory[steps[0]]},
                  f"source weights per step ({args.runs[0]})", "weight")


if __name__ == "__main__":
    main()
