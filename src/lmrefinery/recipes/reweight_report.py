"""What `reweight` leaves behind: weights.json, weights.csv, plots/weights.png, plots/losses.png, report.md."""

from __future__ import annotations

from pathlib import Path

from lmrefinery.config import ReweightConfig
from lmrefinery.data.sources import SourcePool
from lmrefinery.fileio import atomic_write_json, atomic_write_text
from lmrefinery.plots import line_plot
from lmrefinery.scalebio import ScaleBiO
from lmrefinery.train.run_dir import read_metrics


def write_outputs(output_dir: Path, config: ReweightConfig, pool: SourcePool, core: ScaleBiO, steps: int) -> None:
    rows = [m for m in read_metrics(output_dir / "metrics.jsonl") if "weights" in m and "event" not in m]
    start = read_metrics(output_dir / "metrics.jsonl")[0]
    names = pool.names
    weights = dict(zip(names, core.weights.tolist()))
    hyper = config.scalebio
    movement_bound = 0.5 * hyper.lr_weights * steps
    atomic_write_json(output_dir / "weights.json", {
        "weights": weights,
        "logits": dict(zip(names, core.logits.detach().cpu().tolist())),
        "source_sizes": dict(zip(names, pool.sizes)),
        "steps": steps, "alpha": hyper.alpha, "tau": hyper.tau, "rounds": hyper.rounds,
        "logit_movement_bound": movement_bound,
        "config": config.model_dump(mode="json"),
    })
    header = "step," + ",".join(names)
    trajectory = ["0," + ",".join(f"{w:.6f}" for w in start["weights"])]
    trajectory += [f"{m['step']}," + ",".join(f"{m['weights'][n]:.6f}" for n in names) for m in rows]
    atomic_write_text(output_dir / "weights.csv", header + "\n" + "\n".join(trajectory) + "\n")

    plot_steps = [0] + [m["step"] for m in rows]
    line_plot(output_dir / "plots" / "weights.png", plot_steps,
              {n: [start["weights"][i]] + [m["weights"][n] for m in rows] for i, n in enumerate(names)},
              "Source weights p = softmax(λ)", "weight")
    loss_steps = [m["step"] for m in rows]
    line_plot(output_dir / "plots" / "losses.png", loss_steps,
              {"L1(w) validation": [m["val_loss_upper"] for m in rows],
               "L2(u) weighted train": [m["train_loss_lower"] for m in rows],
               "L2(w) − L2(u)": [m["gap"] for m in rows]},
              "ScaleBiO losses", "loss")

    table = ["| source | examples | weight | uniform |", "|---|---:|---:|---:|"]
    table += [f"| {n} | {s} | {weights[n]:.4f} | {1 / len(names):.4f} |" for n, s in zip(names, pool.sizes)]
    last = rows[-1] if rows else {}
    report = [
        f"# ScaleBiO reweighting — {config.model.name_or_path}", "",
        f"{steps} steps, global batch {config.train.batch_size} (validation {config.train.val_batch_size}), "
        f"α = {hyper.alpha}, τ = {hyper.tau}, learning rates u/w/λ = {hyper.lr_lower}/{hyper.lr_upper}/"
        f"{hyper.lr_weights}, LISA {'on (' + str(config.lisa.layers) + ' layers)' if config.lisa.enabled else 'off'}.",
        "", "## Learned weights", "", *table, "",
        f"With Adam on λ each logit moves about lr_λ per step at most, so over these {steps} steps under a cosine "
        f"schedule no logit can have moved more than ≈ {movement_bound:.3g} from 0 "
        f"(a weight ratio of at most ≈ e^{2 * movement_bound:.3g} between two sources).", "",
        "## Trajectories", "", "![weights](plots/weights.png)", "", "![losses](plots/losses.png)", "",
        f"Final: validation loss of w {last.get('val_loss_upper', float('nan')):.4f}, weighted training loss "
        f"u {last.get('train_loss_lower', float('nan')):.4f} / w {last.get('train_loss_upper', float('nan')):.4f}.",
        "", "## Next", "", "```bash",
        f"lmrefinery mix --config my-mix.yaml weights={output_dir / 'weights.json'} num_examples=N",
        f"lmrefinery sft --config my-sft.yaml sampling.strategy=weights sampling.weights={output_dir / 'weights.json'}",
        "```", ""]
    atomic_write_text(output_dir / "report.md", "\n".join(report))
