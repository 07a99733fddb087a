"""`compare`'s data-mixture and selection methods. Each runs, for one seed, in its own process: it builds an SFT set
under the shared token budget from the pool, fine-tunes the base model on it (one pass) and scores the target's test
set, returning aggregate metrics and the per-item values the statistics need."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from lmrefinery.baselines.less import CountSketch, cosine_to_mean, gradient_features, last_block_parameters
from lmrefinery.baselines.mixture import fill_budget, mixture_within_budget, rank_by_score, realised_shares
from lmrefinery.baselines.rho import example_losses, excess_loss
from lmrefinery.compare.stages import evaluate_answers, no_final_checkpoint, run_stage, source_trees, train_tree
from lmrefinery.config import CompareConfig, DataConfig, ReweightConfig, SFTConfig
from lmrefinery.data.sources import read_conversations
from lmrefinery.fileio import atomic_write_text
from lmrefinery.models import load_model
from lmrefinery.recipes import reweight, sft
from lmrefinery.recipes.common import load_data
from lmrefinery.train.distributed import default_device, single_process_progress


def token_budget(config: CompareConfig, pool) -> int:
    """Tokens every method's SFT set may hold: `mixture.token_budget`, else N examples of the pool's mean length
    (N = num_examples, default train.steps × train.batch_size)."""
    if config.mixture.token_budget is not None:
        return config.mixture.token_budget
    mean_length = int(pool.lengths().sum()) / len(pool.examples)
    return round((config.mixture.num_examples or config.train.steps * config.train.batch_size) * mean_length)


def _pools(config: CompareConfig):
    mixture = config.mixture
    data = DataConfig(sources=mixture.sources, max_length=mixture.max_length)
    tokenizer, pool, extras = load_data(config.model, data, {"validation": mixture.validation})
    return tokenizer, pool, extras["validation"]


def _pool_records(config: CompareConfig, pool) -> list[dict]:
    """Each pool example's record as a conversation tagged with its source (the form `mix` writes and SFT reads)."""
    conversations = {s.name: read_conversations(s) for s in config.mixture.sources}
    return [{**conversations[pool.names[e.source_id]][e.record], "source": pool.names[e.source_id]}
            for e in pool.examples]


def sft_records(config: CompareConfig, pool, chosen: list[int], append_validation: bool = False) -> list[dict]:
    """A method's SFT set: the chosen pool examples (each record tagged with its source), then — with
    `append_validation` (the config's, or this run's as an `*_appended` method) — every validation record (tagged
    `validation`), in the order SFT reads them."""
    records = _pool_records(config, pool)
    selected = [records[i] for i in chosen]
    if config.mixture.append_validation or append_validation:
        selected += [{**record, "source": "validation"} for source in config.mixture.validation
                     for record in read_conversations(source)]
    return selected


def selection_cost(forward: int = 0, backward: int = 0, wall_s: float = 0.0) -> dict:
    """What choosing the SFT set cost: example-level forward passes, backward passes and wall time."""
    return {"forward": forward, "backward": backward, "wall_s": wall_s}


def _sft_on(config: CompareConfig, seed: int, directory: Path, pool, chosen: list[int], cost: dict,
            extra: dict | None = None, append_validation: bool = False) -> dict:
    """The shared budget: one pass of SFT of the base model over the chosen pool examples (plus the validation set
    with `append_validation`), then the target's test metrics, per item and aggregated, and the method's cost."""
    mixture = config.mixture
    records = sft_records(config, pool, chosen, append_validation)
    data_path = directory / "selected.jsonl"
    atomic_write_text(data_path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    steps = len(records) // config.train.batch_size
    run_dir = directory / "sft"
    started = time.perf_counter()
    run_stage(sft, SFTConfig, {
        "output_dir": str(run_dir), "seed": seed, "model": config.model.model_dump(),
        "data": {"sources": [{"name": "selected", "path": str(data_path)}], "max_length": mixture.max_length},
        "train": train_tree(config, steps=steps)}, run_dir / "summary.json", run_dir)
    sft_wall = time.perf_counter() - started
    metrics = evaluate_answers(directory / "eval", run_dir / "model", source_trees(mixture.test), mixture.max_length,
                               mixture.exact_match, mixture.max_new_tokens, config.model.precision,
                               config.eval_batch_size)
    counts = pool.counts(chosen)
    sources = [pool.examples[i].source_id for i in chosen]
    trained = steps * config.train.batch_size
    cost = {"selection": cost, "sft": {"forward": trained, "backward": trained, "wall_s": sft_wall},
            "total": {key: cost[key] + value for key, value in
                      (("forward", trained), ("backward", trained), ("wall_s", sft_wall))}}
    return metrics | {"sft_examples": len(chosen), "chosen": chosen, "sft_steps": steps, "examples_per_source": counts,
                      "appended_validation": len(records) - len(chosen), "cost": cost,
                      "realised_shares": realised_shares(sources, pool.names),
                      "unique_examples": len(set(chosen)), "token_budget": token_budget(config, pool),
                      "sft_tokens": int(pool.lengths()[chosen].sum()) if chosen else 0} | (extra or {})


def _mix_and_sft(config: CompareConfig, seed: int, directory: Path, weights: dict[str, float],
                 cost: dict | None = None) -> dict:
    """A weighted mixture that fills the token budget, drawn as `mix` draws (each source without replacement until
    it runs out, then with replacement), so the realised shares follow the weights; then SFT on it."""
    pool = _pools(config)[1]
    per_source = pool.source_indices()
    total = sum(weights[name] for name in pool.names)
    probabilities = [weights[name] / total for name in pool.names]
    drawn = mixture_within_budget([len(indices) for indices in per_source], probabilities,
                                  lambda source, index: int(pool.lengths()[per_source[source][index]]),
                                  token_budget(config, pool), config.train.batch_size, seed)
    return _sft_on(config, seed, directory, pool, [per_source[source][index] for source, index in drawn],
                   cost or selection_cost(), {"weights": dict(zip(pool.names, probabilities))})


def uniform(config: CompareConfig, seed: int, directory: str) -> dict:
    return _mix_and_sft(config, seed, Path(directory), {s.name: 1.0 for s in config.mixture.sources})


def proportional(config: CompareConfig, seed: int, directory: str) -> dict:
    pool = _pools(config)[1]
    return _mix_and_sft(config, seed, Path(directory), dict(zip(pool.names, map(float, pool.sizes))))


def _saved_scores(directory: Path, pool) -> torch.Tensor | None:
    """The scores an interrupted run of this method already wrote (scoring is the expensive part), if complete."""
    path = directory / "scores.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if len(rows) != len(pool.examples):
        return None
    return torch.tensor([row["score"] for row in rows], dtype=torch.float64)


def _select_within_budget(config: CompareConfig, seed: int, pool, scores: torch.Tensor,
                          directory: Path) -> list[int]:
    """The highest-scoring examples that fit the token budget (whole batches), in a seeded shuffled order; writes
    every example's score."""
    order = rank_by_score(scores)
    lengths = pool.lengths()
    count = fill_budget([int(lengths[i]) for i in order], token_budget(config, pool),
                        config.train.batch_size)
    chosen = order[:count]
    selected = set(chosen)
    rows = [{"source": pool.names[e.source_id], "record": e.record, "score": float(scores[i]),
             "selected": i in selected} for i, e in enumerate(pool.examples)]
    atomic_write_text(directory / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    random.Random(seed).shuffle(chosen)
    return chosen


def less(config: CompareConfig, seed: int, directory: str) -> dict:
    """LESS-style: gradient features of the base model's last blocks (CountSketch seeded by `seed`), cosine to the
    mean validation feature."""
    directory = Path(directory)
    tokenizer, pool, validation = _pools(config)
    started = time.perf_counter()
    scores = _saved_scores(directory, pool)
    if scores is None:
        settings = config.mixture.less
        model = load_model(config.model, default_device())
        parameters = last_block_parameters(model, settings.layers)
        sketch = CountSketch([p.numel() for p in parameters], settings.dim, seed, parameters[0].device)
        bar = single_process_progress(len(pool.examples) + len(validation.examples), "LESS gradient features")
        features = [gradient_features(model, examples, sketch, parameters, config.model.precision,
                                      tokenizer.pad_token_id, bar) for examples in (pool, validation)]
        bar.close()
        scores = cosine_to_mean(*features)
        del model
    scored = less_selection_passes(pool, validation)  # one forward and backward each: its gradient features
    cost = selection_cost(scored, scored, time.perf_counter() - started)
    return _sft_on(config, seed, directory, pool, _select_within_budget(config, seed, pool, scores, directory), cost)


def rho(config: CompareConfig, seed: int, directory: str) -> dict:
    """RHO-style, offline: excess loss of the base model over a reference model trained (with `seed`) on the
    validation set; the model being trained is scored once, at its start."""
    directory = Path(directory)
    mixture = config.mixture
    tokenizer, pool, _ = _pools(config)
    started = time.perf_counter()
    reference_dir = directory / "reference"
    run_stage(sft, SFTConfig, {
        "output_dir": str(reference_dir), "seed": seed, "model": config.model.model_dump(),
        "data": {"sources": source_trees(mixture.validation), "max_length": mixture.max_length},
        "train": train_tree(config, steps=mixture.rho.reference_steps, lr=mixture.rho.reference_lr)},
        reference_dir / "summary.json", reference_dir)
    scores = _saved_scores(directory, pool)
    if scores is None:
        losses = {}
        bar = single_process_progress(2 * -(-len(pool.examples) // config.eval_batch_size), "RHO excess loss")
        for role, source in (("current", config.model), ("reference", config.model.model_copy(
                update={"name_or_path": str(reference_dir / "model")}))):
            model = load_model(source, default_device(), training=False)
            losses[role] = example_losses(model, pool, config.eval_batch_size, config.model.precision,
                                          tokenizer.pad_token_id, bar)
            del model
        bar.close()
        scores = excess_loss(losses["current"], losses["reference"])
    reference = mixture.rho.reference_steps * config.train.batch_size  # the reference model's SFT
    cost = selection_cost(reference + 2 * len(pool.examples), reference, time.perf_counter() - started)
    return _sft_on(config, seed, directory, pool, _select_within_budget(config, seed, pool, scores, directory), cost)


def scalebio(config: CompareConfig, seed: int, directory: str) -> dict:
    """`reweight` (with `seed`) against the target's validation set, then the learned mixture."""
    directory = Path(directory)
    mixture = config.mixture
    run_dir = directory / "reweight"
    reweight_tree = mixture.reweight.model_dump(mode="json")
    reweight_tree["train"] |= no_final_checkpoint(mixture.reweight.train)
    model = config.model.model_dump()
    if (precision := reweight_tree.pop("precision")) is not None:
        model["precision"] = precision
    started = time.perf_counter()
    run_stage(reweight, ReweightConfig, {
        "output_dir": str(run_dir), "seed": seed, "model": model,
        "data": {"sources": source_trees(mixture.sources), "max_length": mixture.max_length},
        "validation": {"sources": source_trees(mixture.validation)},
        **reweight_tree}, run_dir / "weights.json", run_dir)
    result = json.loads((run_dir / "weights.json").read_text())
    learned, steps = result["weights"], result["steps"]
    per_step = scalebio_step_passes(config)
    cost = selection_cost(steps * per_step, steps * per_step, time.perf_counter() - started)
    return _mix_and_sft(config, seed, directory, learned, cost) | {"learned_weights": learned}


def scalebio_step_passes(config: CompareConfig) -> int:
    """Example-level passes of one ScaleBiO step (forward and backward alike): u and w on the training batch, w on
    the validation batch."""
    settings = config.mixture.reweight.train
    return 2 * settings.batch_size + settings.val_batch_size


def _base_result(base_directory: str) -> dict:
    return json.loads((Path(base_directory) / "result.json").read_text())


def appended(config: CompareConfig, seed: int, directory: str, base_directory: str) -> dict:
    """`<method>_appended`: the method's own SFT set (read from its finished run for this seed, so the selection is
    not redone and its selection cost is the method's) with the target's validation set appended, as the ScaleBiO
    authors' final SFT did."""
    base = _base_result(base_directory)
    pool = _pools(config)[1]
    carried = {key: base[key] for key in ("weights", "learned_weights") if key in base}
    return _sft_on(config, seed, Path(directory), pool, base["chosen"], base["cost"]["selection"], carried,
                   append_validation=True)


def less_selection_passes(pool, validation) -> int:
    """LESS-style's selection cost in example-level passes (forward and backward alike): one per pool and validation
    example."""
    return len(pool.examples) + len(validation.examples)


def scalebio_at_less_cost(config: CompareConfig, seed: int, directory: str, base_directory: str) -> dict:
    """ScaleBiO at equal selection compute with LESS-style: the weights its `reweight` run (this seed's `scalebio`)
    logged after the first step N whose passes reach LESS-style's, then the same mixture draw and SFT. With a constant
    schedule and no warm-up (the config requires it) those are the weights an N-step run ends with; the selection's
    wall time is the run's, pro rata."""
    _, pool, validation = _pools(config)
    per_step = scalebio_step_passes(config)
    trajectory = reweight.weight_trajectory(Path(base_directory) / "reweight")
    run_steps = max(trajectory)
    steps = min(run_steps, -(-less_selection_passes(pool, validation) // per_step))
    weights = trajectory[steps]
    wall = _base_result(base_directory)["cost"]["selection"]["wall_s"] * steps / run_steps
    cost = selection_cost(steps * per_step, steps * per_step, wall)
    return _mix_and_sft(config, seed, Path(directory), weights, cost) | {"learned_weights": weights,
                                                                        "reweight_steps": steps}


METHODS = {"uniform": uniform, "proportional": proportional, "less": less, "rho": rho, "scalebio": scalebio,
           "scalebio_at_less_cost": scalebio_at_less_cost}
APPENDED = "_appended"
METHODS |= {name + APPENDED: appended for name in list(METHODS)}


def depends_on(name: str) -> str | None:
    """The method whose finished run (same seed) this one reads: `*_appended` its own selection's, the equal-compute
    ScaleBiO the `reweight` run of `scalebio`."""
    if name.endswith(APPENDED):
        return name[:-len(APPENDED)]
    return "scalebio" if name == "scalebio_at_less_cost" else None
