"""Which examples carry ScaleBiO's λ-gradient? u and w from one `reweight` checkpoint, every pool example's loss under
both, each example's difference split into its answer tokens and its end-of-turn tokens.

λ_k's gradient is α·p_k·(Δ̄_k − Σ_j p_j·Δ̄_j), Δ̄_k the mean over source k's examples in the step's batch of Δ_e =
ℓ_e(w) − ℓ_e(u), ℓ_e the example's token-mean loss (docs/methods/scalebio.md): a source gains weight where w fits it
better than u does. Here Δ_e is taken at one checkpoint's u and w for every example of the pool, so the λ-gradient
the whole pool implies can be read apart — per source, into what the answer tokens and what the end-of-turn tokens
contribute (Δ_e is the sum of the two parts, each a sum over those tokens divided by the example's token count, and
recomputed over the examples whose reply is one answer token), and into examples: one source's examples ranked by
Δ_e, and every example grouped by its reply text and by how many answer tokens the reply has, over the sources whose
name starts with `--family`; and there, the corrupted examples' Δ_e against the clean ones' (difference of means
with a bootstrap 95% CI, and a Mann–Whitney test, scipy): whether w fits the corrupted replies worse than u does at
all — raw, and with what the reply's value explains taken out (each Δ_e minus the mean Δ of the kind's examples with
the same reply), which is the part a wrong count that is still a well-formed number can be told apart by (over the
reply values both groups have). Last, per reply value: its share of the validation replies over its share of the
family's, against its mean Δ (Spearman): whether w's advantage follows the validation set's answer frequencies.

The check that the pool-wide figure is the one the run followed: its cosine with the mean λ-gradient the run
logged over the `--window` steps up to the checkpoint.

    python bench/lambda_gradient_examples.py --run results/diagnosis-b/fp32-100 --step 100 \
        --family letter_counting --source letter_counting_wrong_answers_0.8
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lambda_gradient_spread import cosine  # noqa: E402
from lmrefinery.config import ReweightConfig  # noqa: E402
from lmrefinery.config.loading import load_config  # noqa: E402
from lmrefinery.data.collate import collate  # noqa: E402
from lmrefinery.data.files import read_records  # noqa: E402
from lmrefinery.data.tokenize import IGNORE_INDEX  # noqa: E402
from lmrefinery.models import load_model  # noqa: E402
from lmrefinery.recipes.common import load_data  # noqa: E402
from lmrefinery.scalebio import weight_gradient  # noqa: E402
from lmrefinery.train.checkpoint_format import checkpoint_steps  # noqa: E402
from lmrefinery.train.checkpoint_load import full_tensors  # noqa: E402
from lmrefinery.train.losses import response_logits  # noqa: E402
from lmrefinery.train.run_dir import read_metrics  # noqa: E402


def checkpoint_directory(run: Path, step: int) -> Path:
    directory = run / "checkpoints" / f"step-{step}"
    if not directory.is_dir():
        raise SystemExit(f"{run}: no checkpoint of step {step} (it has {checkpoint_steps(run)}); "
                         f"train.checkpoint_every keeps them")
    return directory


def load_copy(config: ReweightConfig, checkpoint: Path, name: str):
    model = load_model(config.model, "cpu", max_length=config.data.max_length)
    state = full_tensors(checkpoint, prefix=f"module/{name}/")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise SystemExit(f"{checkpoint}: module/{name}/ does not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model.eval()


@torch.no_grad()
def token_losses(model, examples, pad_id: int, precision: str, batch_size: int = 16) -> list[torch.Tensor]:
    """Per example: the cross-entropy of each supervised token, in order."""
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
        response = response_logits(model, collate(chunk, pad_id), precision)
        losses = F.cross_entropy(response.logits.float(), response.targets, reduction="none")
        out.extend(losses.split(response.counts().tolist()))
    return out


def records(sources) -> list[dict]:
    """Every record of `sources`, in pool order (sources in order, records in file order)."""
    return [record.fields for source in sources
            for record in read_records(source.path, source.split, source.subset)]


def mean_or_none(values: list[float]) -> float | None:
    return float(f"{statistics.fmean(values):.4g}") if values else None


def contrast(corrupted: list[float], clean: list[float]) -> dict | None:
    """Mean Δ of the corrupted examples minus the clean ones', with a bootstrap 95% CI and a Mann–Whitney p."""
    if len(corrupted) < 2 or len(clean) < 2:
        return None
    a, b = np.asarray(corrupted), np.asarray(clean)
    interval = stats.bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis), vectorized=True,
                               random_state=0).confidence_interval
    return {"corrupted": len(a), "clean": len(b), "mean_corrupted": float(f"{a.mean():.4g}"),
            "mean_clean": float(f"{b.mean():.4g}"), "difference": float(f"{a.mean() - b.mean():.4g}"),
            "ci95": [float(f"{interval.low:.4g}"), float(f"{interval.high:.4g}")],
            "mann_whitney_p": float(f"{stats.mannwhitneyu(a, b).pvalue:.3g}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path, help="a reweight run directory with checkpoints")
    parser.add_argument("--step", required=True, type=int, help="the checkpoint's step")
    parser.add_argument("--family", help="group the replies of the sources whose name starts with this")
    parser.add_argument("--source", help="list this source's examples (default: the heaviest at --step)")
    parser.add_argument("--kinds", nargs="+", default=["dot", "wrong_answers"],
                        help="noise kinds of the family's partitions to contrast corrupted with clean examples in")
    parser.add_argument("--window", type=int, default=10, help="logged λ-gradients averaged for the check")
    parser.add_argument("--out", type=Path, help="write the JSON here as well")
    args = parser.parse_args()

    config = load_config(ReweightConfig, args.run / "config.yaml")
    tokenizer, pool, _ = load_data(config.model, config.data)
    rows = records(config.data.sources)
    if len(rows) != len(pool.examples):
        raise SystemExit(f"{len(rows)} records but {len(pool.examples)} pool examples: some were dropped")
    checkpoint = checkpoint_directory(args.run, args.step)
    logged = [r for r in read_metrics(args.run / "metrics.jsonl")
              if r.get("step") is not None and "weight_gradient" in r]
    at_step = {r["step"]: r for r in logged}
    weights = torch.tensor([at_step[args.step]["weights"][n] for n in pool.names], dtype=torch.float64)
    alpha = config.scalebio.alpha

    # the end of a turn: the chat template's special tokens (SmolLM2: <|im_end|>) and the whitespace around them
    end_ids = set(tokenizer.all_special_ids) | ({tokenizer.eos_token_id} - {None})
    losses = {}
    for name in ("lower", "upper"):
        model = load_copy(config, checkpoint, name)
        losses[name] = token_losses(model, pool.examples, tokenizer.pad_token_id, config.model.precision)
        del model

    end_of_turn = {}  # token id → whether it ends the turn, decoded once per id

    def ends_turn(token: int) -> bool:
        if token not in end_of_turn:
            end_of_turn[token] = token in end_ids or tokenizer.decode([token]).strip() == ""
        return end_of_turn[token]

    per_example = []
    for index, example in enumerate(pool.examples):
        targets = [t for t in example.labels[1:] if t != IGNORE_INDEX]
        u, w = losses["lower"][index].double(), losses["upper"][index].double()
        is_end = torch.tensor([ends_turn(t) for t in targets])
        n = len(targets)
        delta = (w - u) / n
        per_example.append({
            "index": index, "source": pool.names[example.source_id], "reply": rows[index]["messages"][-1]["content"],
            "original": rows[index].get("original_answer"), "corrupted": bool(rows[index].get("corrupted", False)),
            "answer_tokens": int((~is_end).sum()), "loss_u": float(u.mean()), "loss_w": float(w.mean()),
            "delta": float(delta.sum()), "delta_answer": float(delta[~is_end].sum()),
            "delta_end": float(delta[is_end].sum())})

    by_source = collections.defaultdict(list)
    for item in per_example:
        by_source[item["source"]].append(item)
    means = torch.tensor([statistics.fmean(e["delta"] for e in by_source[n]) for n in pool.names], dtype=torch.float64)
    # every source present: the λ-gradient the run's own formula gives for the whole pool at this checkpoint
    implied = weight_gradient(weights, torch.zeros_like(means), means, torch.ones_like(means, dtype=torch.bool),
                              alpha).tolist()
    window = [r for r in logged if args.step - args.window < r["step"] <= args.step]
    mean_logged = [statistics.fmean(r["weight_gradient"][n] for r in window) for n in pool.names]

    sources = []
    for k, name in enumerate(pool.names):
        items = by_source[name]
        sources.append({"source": name, "weight": round(float(weights[k]), 4),
                        "delta": float(f"{statistics.fmean(e['delta'] for e in items):.4g}"),
                        "from_answer": float(f"{statistics.fmean(e['delta_answer'] for e in items):.4g}"),
                        "from_end": float(f"{statistics.fmean(e['delta_end'] for e in items):.4g}"),
                        # without the replies of several answer tokens (e.g. two-digit numbers among one-digit ones)
                        "one_token_replies": mean_or_none([e["delta"] for e in items if e["answer_tokens"] == 1]),
                        "implied_gradient": float(f"{implied[k]:.3g}"),
                        "logged_gradient": float(f"{mean_logged[k]:.3g}"),
                        "loss_u": round(statistics.fmean(e["loss_u"] for e in items), 4),
                        "loss_w": round(statistics.fmean(e["loss_w"] for e in items), 4)})
    sources.sort(key=lambda s: s["delta"])

    chosen = args.source or pool.names[int(weights.argmax())]
    listed = sorted(by_source[chosen], key=lambda e: e["delta"])
    family = [e for e in per_example if args.family and e["source"].startswith(args.family)]
    by_reply = collections.defaultdict(list)
    by_length = collections.defaultdict(list)
    for item in family:
        by_reply[item["reply"]].append(item["delta"])
        by_length[item["answer_tokens"]].append(item["delta"])

    reply_mean = {reply: statistics.fmean(v) for reply, v in by_reply.items()}
    contrasts = {}
    for kind in args.kinds:  # compare names a target partition `<family>_<kind>_<rate>`
        members = [e for e in family if f"_{kind}_" in e["source"]]
        corrupted = [e for e in members if e["corrupted"]]
        clean = [e for e in members if not e["corrupted"]]
        contrasts[kind] = {"raw": contrast([e["delta"] for e in corrupted], [e["delta"] for e in clean])}
        # The partitions' examples are corrupted at random, so the raw contrast is a randomised comparison; a wrong
        # count that is itself a well-formed number can still differ from a right one by its value, so within each
        # reply value that both groups have, each Δ_e minus that value's mean: what is left is the question's part.
        shared = {e["reply"] for e in corrupted} & {e["reply"] for e in clean}
        strata = {r: statistics.fmean(e["delta"] for e in members if e["reply"] == r) for r in shared}
        contrasts[kind]["reply_adjusted"] = contrast(
            [e["delta"] - strata[e["reply"]] for e in corrupted if e["reply"] in strata],
            [e["delta"] - strata[e["reply"]] for e in clean if e["reply"] in strata])

    validation_replies = collections.Counter(
        row["messages"][-1]["content"] for row in records(config.validation.sources))
    ratio = {reply: (validation_replies[reply] / sum(validation_replies.values())) / (len(v) / len(family))
             for reply, v in by_reply.items()}
    replies = sorted(by_reply)
    prior = None
    if len(replies) > 2:
        rho = stats.spearmanr([ratio[r] for r in replies], [reply_mean[r] for r in replies])
        prior = {"spearman_rho": round(float(rho.statistic), 3), "p": float(f"{rho.pvalue:.3g}"),
                 "replies": len(replies)}

    summary = {
        "run": str(args.run), "step": args.step, "alpha": alpha,
        "cosine_implied_vs_logged": round(cosine(implied, mean_logged), 3), "window": args.window,
        "sources_by_delta": sources,
        "examples_of": chosen,
        "examples": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()} for e in listed],
        "family": args.family,
        "corrupted_vs_clean": contrasts,
        "reply_delta_vs_validation_share": prior,
        "by_reply": {reply: {"n": len(v), "mean_delta": float(f"{statistics.fmean(v):.4g}"),
                             "validation_over_family_share": round(ratio[reply], 3)}
                     for reply, v in sorted(by_reply.items(), key=lambda kv: statistics.fmean(kv[1]))},
        "by_answer_tokens": {n: {"examples": len(v), "mean_delta": float(f"{statistics.fmean(v):.4g}")}
                             for n, v in sorted(by_length.items())},
    }
    text = json.dumps(summary, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
