"""The distilled students' probability mass on the teacher's top-k ids, per training step, from a `compare` run.

Reads every `<method>/seed-N/run/metrics.jsonl` under the distillation directory that logged `student_topk_mass`
(top-k-cache methods) and draws one line per method and seed; prints the first, step-100 and last values as JSON.
A loss that cannot hold the mass up (the restricted top-k KL) shows as lines falling towards 0.

    python bench/student_mass.py results/evidence-a/distillation/distillation --output docs/img/evidence-a-first-mass.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def mass_trajectories(directory: Path) -> dict[str, tuple[list[int], list[float]]]:
    from lmrefinery.train.run_dir import read_metrics

    series = {}
    for metrics in sorted(directory.glob("*/seed-*/run/metrics.jsonl")):
        rows = [m for m in read_metrics(metrics) if "student_topk_mass" in m]
        if rows:
            method, seed = metrics.parents[2].name, metrics.parents[1].name
            series[f"{method} {seed}"] = ([m["step"] for m in rows], [m["student_topk_mass"] for m in rows])
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="the compare run's distillation directory")
    parser.add_argument("--output", type=Path, required=True, help="PNG to write")
    args = parser.parse_args()
    from lmrefinery.plots import save_figure
    import matplotlib.pyplot as plt

    series = mass_trajectories(args.directory)
    if not series:
        raise SystemExit(f"{args.directory}: no run logged student_topk_mass")
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    methods = sorted({label.rsplit(" ", 1)[0] for label in series})
    colours = plt.get_cmap("tab10").colors
    for label, (steps, values) in series.items():
        method = label.rsplit(" ", 1)[0]
        axes.plot(steps, values, color=colours[methods.index(method) % len(colours)], linewidth=1.2, alpha=0.8,
                  label=method if label.endswith("seed-0") else None)
    axes.set(title="student mass on the teacher's top-k ids", xlabel="step", ylabel="mass", ylim=(0, 1))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, args.output)
    print(json.dumps({label: {"first": values[0], "step_100": dict(zip(steps, values)).get(100), "last": values[-1]}
                      for label, (steps, values) in series.items()}, indent=2))


if __name__ == "__main__":
    main()
