"""`lmrefinery reweight`: learn per-source data weights with ScaleBiO on an LLM.

setup (data, u and w as two full copies — optionally with LISA on each — or as two LoRA adapters of one frozen
base, the ScaleBiO core) → the shared loop, each step one training batch (`train.sampling`: pooled — uniform over
all examples — or stratified — a fixed share per source) + one validation batch → outputs (weights.json,
weights.csv, plots/weights.png, plots/losses.png, report.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import torch

from lmrefinery.config import ReweightConfig, SamplingConfig
from lmrefinery.errors import TrainingDiverged
from lmrefinery.data.collate import collate, rank_micro_batches
from lmrefinery.data.sampling import MixtureSampler
from lmrefinery.data.sources import SourcePool
from lmrefinery.fileio import atomic_write_json, atomic_write_text
from lmrefinery.models import load_model
from lmrefinery.models.lora import AdapterView
from lmrefinery.plots import line_plot
from lmrefinery.recipes.common import (accumulation_steps, begin_training_run, close_trackers, load_data, make_lisa,
                                       open_trackers, total_steps, trainable_model)
from lmrefinery.scalebio import PLATEAU_SHARE, SIGNAL_LEVEL, ScaleBiO, settle_verdict
from lmrefinery.train.distributed import all_reduce_sum
from lmrefinery.train.loop import Loop, run_loop
from lmrefinery.train.losses import example_loss_sums
from lmrefinery.train.optim import schedule_multiplier
from lmrefinery.train.precision import resolve_precision
from lmrefinery.train.run_dir import read_metrics
from lmrefinery.train.save import save_hf_model, save_lora

log = logging.getLogger(__name__)
POOLED = SamplingConfig(strategy="proportional")  # uniform over the pooled examples, as the method prescribes
STRATIFIED = SamplingConfig(strategy="stratified")


def warn_rare_sources(pool, batch_size: int) -> list[str]:
    """Pooled batches contain a small source beside large ones rarely (20 beside 2,000: ~9% of batches of 8), and
    its λ moves only on those steps: say so, and what helps."""
    total = len(pool.examples)
    rare = [f"{name} ({batch_size * size / total:.2f})" for name, size in zip(pool.names, pool.sizes)
            if batch_size * size / total < 1]
    if rare:
        log.warning("expected examples per training batch below 1 for %s: their weights move only on the steps that "
                    "draw them; train.sampling=stratified puts every source in every batch", ", ".join(rare))
    return rare


def build_core(config: ReweightConfig, upper, lower, num_sources: int, steps: int, env) -> ScaleBiO:
    precision = config.model.precision

    def train_loss_fn(model, batch):
        sums, tokens = example_loss_sums(model, batch, precision)
        return sums / tokens.clamp(min=1), batch.source_ids

    def val_loss_fn(model, batch):
        sums, tokens = example_loss_sums(model, batch, precision)
        return sums.sum() / tokens.sum().clamp(min=1)

    hyper, schedule = config.scalebio, config.train
    return ScaleBiO(upper, num_sources, train_loss_fn, val_loss_fn, lower_model=lower, alpha=hyper.alpha,
                    tau=hyper.tau, rounds=hyper.rounds, lr_lower=hyper.lr_lower, lr_upper=hyper.lr_upper,
                    lr_weights=hyper.lr_weights, optimizer=hyper.optimizer, weight_decay=hyper.weight_decay,
                    betas=hyper.adam_betas, eps=hyper.adam_eps, total_steps=steps, schedule=schedule.schedule,
                    warmup_ratio=schedule.warmup_ratio, warmup_steps=schedule.warmup_steps,
                    min_lr_ratio=schedule.min_lr_ratio, max_grad_norm=hyper.max_grad_norm,
                    max_weight_grad_norm=hyper.max_weight_grad_norm, source_ids_fn=lambda batch: batch.source_ids,
                    val_weight_fn=lambda batch: batch.supervised_tokens,
                    all_reduce=lambda tensor: all_reduce_sum(tensor, env), gradient_sum_factor=env.world_size,
                    log_alignment=hyper.log_alignment)


def warn_if_bf16(precision: str, device) -> bool:
    """The λ-gradient is built from differences of nearly equal losses of u and w; under bf16 autocast their
    rounding noise can outweigh those differences (docs/reweight.md#precision): say so when a run computes in bf16."""
    if resolve_precision(precision, device) != "bf16":
        return False
    log.warning("model.precision resolves to bf16: the λ-gradient (differences of nearly equal losses of u and w) can "
                "be dominated by bf16 rounding — on the evidence's data, two attention kernels that agree to 1e-5 in "
                "fp32 gave λ-gradients with mean cosine 0.06 in bf16 and 1.00 in fp32 (docs/reweight.md#precision). "
                "model.precision=fp32 keeps the weights' signal above the rounding, at ≈ 1.6 × the step time here.")
    return True


def run(config: ReweightConfig, resume: bool | str = False) -> Path:
    resume = resume or config.resume  # the --resume flag, else the config's `resume`
    env, output_dir = begin_training_run(config, resume)
    train = config.train
    warn_if_bf16(config.model.precision, env.device)

    tokenizer, pool, extras = load_data(config.model, config.data, {"validation": config.validation.sources})
    validation = extras["validation"]
    accumulation_steps(train.batch_size, train.micro_batch_size, env.world_size)
    accumulation_steps(train.val_batch_size, train.micro_batch_size, env.world_size, "train.val_batch_size")
    steps = total_steps(train.steps, train.epochs, pool, train.batch_size)
    sampling = STRATIFIED if train.sampling == "stratified" else POOLED
    train_sampler = MixtureSampler.build(sampling, pool.names, pool.source_indices(), train.batch_size, config.seed)
    if train.sampling == "pooled":
        warn_rare_sources(pool, train.batch_size)
    val_sampler = MixtureSampler.build(POOLED, validation.names, validation.source_indices(), train.val_batch_size,
                                       config.seed + 1)

    def base_model():
        return load_model(config.model, env.device, max_length=config.data.max_length)

    if config.lora.enabled:  # u and w: two adapters of one frozen base
        shared = trainable_model(base_model(), config.lora, env, config.seed, adapters=("upper", "lower"))
        upper, lower = AdapterView(shared, "upper"), AdapterView(shared, "lower")
        modules = {"adapters": shared}
    else:  # u and w: two full copies
        upper = trainable_model(base_model(), config.lora, env, config.seed)
        lower = trainable_model(base_model(), config.lora, env, config.seed)
        modules = {"lower": lower, "upper": upper}
    core = build_core(config, upper, lower, len(pool.names), steps, env)
    # the optimizers' state is keyed by parameter names of the module that holds the parameters
    holder = {name: modules.get("adapters", module) for name, module in (("lower", lower), ("upper", upper))}
    lisas = {}
    if config.lisa.enabled:  # u and w draw their blocks independently, or (one seed) the same blocks at every switch
        shared_draw = config.scalebio.lisa_draw == "shared"
        lisas = {"lower": make_lisa(lower, core.lower_optimizer, config.lisa, 2 * config.seed + 1),
                 "upper": make_lisa(upper, core.upper_optimizer, config.lisa,
                                    2 * config.seed + (1 if shared_draw else 2))}

    def micro_batches(sampler, examples_pool):
        indices = sampler.next_batch()
        # grouped by length (the pool reads its token counts once and keeps them)
        batches = [collate([examples_pool.examples[i] for i in share], tokenizer.pad_token_id).to(env.device)
                   for share in rank_micro_batches(indices, env.rank, env.world_size, train.micro_batch_size,
                                                   examples_pool.lengths())]
        return indices, batches

    def step(index: int) -> dict:
        train_indices, train_batches = micro_batches(train_sampler, pool)
        _, val_batches = micro_batches(val_sampler, validation)
        result = core.step(train_batches, val_batches)
        result["weight_gradient"] = dict(zip(pool.names, result["weight_gradient"]))
        return {"weights": dict(zip(pool.names, core.weights.tolist())), **result,
                "source_counts": pool.counts(train_indices)}

    short = [name[:10] for name in pool.names]
    trackers = open_trackers(config, output_dir, env)
    loop = Loop(
        name="reweight", config=config, output_dir=output_dir, env=env, steps=steps, schedule=train,
        modules=modules,
        optimizers={"lower": (holder["lower"], core.lower_optimizer), "upper": (holder["upper"], core.upper_optimizer)},
        stateful={"train_sampler": train_sampler, "val_sampler": val_sampler},
        # λ and its optimizer; u and w with their optimizers are checkpointed as modules above
        objects={"scalebio": SimpleNamespace(state_dict=lambda: core.state_dict(include_models=False),
                                             load_state_dict=core.load_state_dict)},
        layer_samplers=lisas,
        start_record={"sources": pool.names, "source_sizes": pool.sizes, "validation_sources": validation.names,
                      "validation_size": len(validation.examples), "weights": core.weights.tolist(),
                      "data_stats": [vars(s) for s in pool.stats],
                      "precision": resolve_precision(config.model.precision, env.device)},
        postfix=lambda metrics: " ".join(f"{n}={w:.3f}" for n, w in zip(short, metrics["weights"].values())),
        trackers=trackers)
    try:
        run_loop(loop, step, resume)
    except TrainingDiverged as exc:  # the weights before the failing step, beside the last good checkpoint
        if env.is_main:
            write_outputs(output_dir, config, pool, core, core.steps_done, diverged=str(exc))
        raise

    if config.save_upper_model and config.lora.enabled:
        save_lora(modules["adapters"], tokenizer, output_dir / "upper_adapter", env, adapter="upper",
                  merged_directory=output_dir / "upper_model" if config.lora.merge else None)
    elif config.save_upper_model:
        save_hf_model(upper, tokenizer, output_dir / "upper_model", env)
    if env.is_main:
        signal = write_outputs(output_dir, config, pool, core, steps)
        log.info("weights: %s", {n: round(w, 4) for n, w in zip(pool.names, core.weights.tolist())})
        warn_if_unsettled(signal)
        log.info("outputs in %s (weights.json, weights.csv, plots/, report.md)", output_dir)
    close_trackers(trackers, output_dir)
    return output_dir


def weight_trajectory(output_dir: Path) -> dict[int, dict[str, float]]:
    """The weights a `reweight` run logged after each step ({step: {source: weight}}). With a constant schedule and
    no warm-up nothing in a step depends on the run's length, so the weights after step N are those an N-step run
    ends with (tests/test_reweight.py)."""
    return {m["step"]: m["weights"] for m in read_metrics(Path(output_dir) / "metrics.jsonl")
            if isinstance(m.get("weights"), dict) and "event" not in m}


def lambda_gradient_signal(rows: list[dict], names: list[str], weights: list[float]) -> dict:
    """The settle guard on a run's logged steps (scalebio.settle_verdict): per source, the signal-to-noise of its
    λ-gradient over the last quarter of the steps (at least 2); whether the top-weighted source is pushed up there, or
    was pushed up before and the weights have since stopped (a plateau). `weights`: the final ones (λ starts at 0, so
    the weights before the first step are uniform)."""
    logged = [row for row in rows if "weight_gradient" in row and isinstance(row.get("weights"), dict)]
    gradients = torch.tensor([[row["weight_gradient"][n] for n in names] for row in logged],
                             dtype=torch.float64).reshape(len(logged), len(names))
    uniform = [1.0 / len(names)] * len(names)
    trajectory = torch.tensor([uniform] + [[row["weights"][n] for n in names] for row in logged] if logged
                              else [weights], dtype=torch.float64)
    verdict = settle_verdict(gradients, trajectory)
    return {"window_steps": verdict.window, "blocks": verdict.signal.dof + 1,
            "snr": dict(zip(names, verdict.signal.snr.tolist())),
            "mean_gradient": dict(zip(names, verdict.signal.mean.tolist())), "top_source": names[verdict.top],
            "pushed": verdict.pushed, "plateau": verdict.plateau, "settled": verdict.settled,
            "earlier_push": verdict.earlier_push, "moved_last_window": verdict.moved_window,
            "moved_before": verdict.moved_before, "plateau_share": PLATEAU_SHARE,
            "level": SIGNAL_LEVEL, "threshold": verdict.threshold}


def settle_sentence(signal: dict) -> str:
    """The guard's verdict in report.md's words."""
    top = signal["top_source"]
    if signal["pushed"]:
        return f"Settled: the top-weighted source ({top}) is pushed up consistently."
    if signal["plateau"]:
        return (f"Settled on a plateau: the top-weighted source ({top}) was pushed up consistently earlier, and the "
                f"last window moved the weights {signal['moved_last_window']:.3f} (total variation) against "
                f"{signal['moved_before']:.3f} before it.")
    return (f"**Not settled**: the top-weighted source ({top}) is not pushed up consistently, and the weights are not "
            "on a plateau; see the warning in the log.")


def warn_if_unsettled(signal: dict) -> bool:
    if signal["settled"]:
        return False
    top = signal["top_source"]
    log.warning("the weights have not settled: over the last %d steps the top-weighted source %s is not pushed up "
                "consistently (λ-gradient signal-to-noise %.2f, threshold %.2f for %d sources at family-wise level "
                "%g), nor are they on a plateau (pushed up consistently in an earlier window: %s; the last window "
                "moved the weights %.3f in total variation against %.3f before it, a plateau needs under %g of it), "
                "so the ranking's top reflects batch noise more than the data. Try more steps (train.steps), "
                "train.sampling=stratified (every source in every batch) or a larger train.batch_size.",
                signal["window_steps"], top, signal["snr"][top], signal["threshold"], len(signal["snr"]),
                signal["level"], "yes" if signal["earlier_push"] else "no", signal["moved_last_window"],
                signal["moved_before"], signal["plateau_share"])
    return True


def write_outputs(output_dir: Path, config: ReweightConfig, pool: SourcePool, core: ScaleBiO, steps: int,
                  diverged: str | None = None) -> dict:
    """`diverged`: the run stopped on non-finite values; the weights written are the last good ones (after `steps`)."""
    metrics = read_metrics(output_dir / "metrics.jsonl")
    rows = [m for m in metrics if "weights" in m and "event" not in m]
    signal = lambda_gradient_signal(rows, pool.names, core.weights.tolist())
    start = metrics[0]
    names = pool.names
    weights = dict(zip(names, core.weights.tolist()))
    hyper = config.scalebio
    # Adam moves each logit by at most about lr per step: the bound is the sum of λ's learning rates over the run
    multiplier = schedule_multiplier(config.train, steps)
    movement_bound = hyper.lr_weights * sum(multiplier(step) for step in range(steps))
    atomic_write_json(output_dir / "weights.json", {
        "weights": weights,
        "logits": dict(zip(names, core.logits.detach().cpu().tolist())),
        "source_sizes": dict(zip(names, pool.sizes)),
        "steps": steps, "alpha": hyper.alpha, "tau": hyper.tau, "rounds": hyper.rounds,
        "logit_movement_bound": movement_bound,
        "lambda_gradient_signal": signal,
        **({"diverged": diverged} if diverged else {}),
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
        f"λ-gradient signal-to-noise over the last {signal['window_steps']} steps (|mean| / standard error of "
        f"{signal['blocks']} block means; ≥ {signal['threshold']:.2f} is a consistent push at family-wise level "
        f"{signal['level']:g} over the sources): "
        + ", ".join(f"{n} {v:.2f}" for n, v in signal["snr"].items())
        + ". " + settle_sentence(signal), "",
        f"With Adam on λ each logit moves about lr_λ per step at most, so over these {steps} steps under the "
        f"{config.train.schedule} schedule no logit can have moved more than ≈ {movement_bound:.3g} from 0 "
        f"(a weight ratio of at most ≈ e^{2 * movement_bound:.3g} between two sources).", "",
        "## Trajectories", "", "![weights](plots/weights.png)", "", "![losses](plots/losses.png)", "",
        f"Final: validation loss of w {last.get('val_loss_upper', float('nan')):.4f}, weighted training loss "
        f"u {last.get('train_loss_lower', float('nan')):.4f} / w {last.get('train_loss_upper', float('nan')):.4f}.",
        "", "## Next", "", "```bash",
        f"lmrefinery mix --config my-mix.yaml weights={output_dir / 'weights.json'} num_examples=N",
        f"lmrefinery sft --config my-sft.yaml sampling.strategy=weights sampling.weights={output_dir / 'weights.json'}",
        "```", ""]
    atomic_write_text(output_dir / "report.md", "\n".join(report))
    return signal
