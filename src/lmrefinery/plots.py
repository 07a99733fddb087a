"""Small matplotlib helpers shared by recipes: line plots of trajectories, written atomically as PNG."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(figure, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure as PNG through a temporary file, then close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp-plot.png")
    figure.savefig(temporary)
    plt.close(figure)
    os.replace(temporary, path)
    return path


def line_plot(path: str | os.PathLike, steps: list[int], series: dict[str, list[float]], title: str,
              ylabel: str, xlabel: str = "step") -> Path:
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    for label, values in series.items():
        axes.plot(steps[: len(values)], values, label=label, linewidth=1.6)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    return save_figure(figure, path)


def loss_plot(path: str | os.PathLike, train: tuple[list[int], list[float]],
              validation: tuple[list[int], list[float]] | None, title: str) -> Path:
    """Training loss per step and, when there is one, the validation loss at its evaluation steps."""
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    axes.plot(*train, label="training loss", linewidth=1.2, alpha=0.8)
    if validation is not None and validation[0]:
        axes.plot(*validation, "o-", label="validation loss", linewidth=1.6)
    axes.set(title=title, xlabel="step", ylabel="loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def bar_panels(path: str | os.PathLike, labels: list[str], panels: dict[str, list], title: str) -> Path:
    """One bar chart per metric, side by side, the same methods (labels) on each; missing values (NaN) are left out.
    A panel's values may be (value, low, high) triples: the bars then carry their confidence intervals."""
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), dpi=120, squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for axis, (metric, values) in zip(axes[0], panels.items()):
        positions = range(len(labels))
        errors = None
        if values and isinstance(values[0], (tuple, list)):
            # A percentile bootstrap interval of a set metric (ECE) need not contain the value computed on the whole
            # set: a model that is never right has ECE = its mean confidence, and every resample's ECE lies on one
            # side of it. Such a bar gets no whisker on that side rather than a negative one matplotlib refuses.
            errors = [[max(v - low, 0.0) for v, low, _ in values], [max(high - v, 0.0) for v, _, high in values]]
            values = [v for v, _, _ in values]
        axis.bar(positions, values, color=[colours[i % len(colours)] for i in positions], yerr=errors, capsize=3)
        axis.set_xticks(list(positions), labels, rotation=40, ha="right", fontsize=8)
        axis.set_title(metric, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)
