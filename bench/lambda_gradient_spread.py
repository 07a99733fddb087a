"""How noisy is ScaleBiO's λ-gradient under LISA with independent draws (the authors'), LISA with one shared draw for
u and w, and no LISA (two full copies)? Side by side on the same batches, in one run.

Design (fixed before any result): the same `reweight` config is run three times for `--steps` steps through the real
command, differing only in LISA (`lisa.enabled`, `scalebio.lisa_draw`). λ's learning rate is set to 0, so every step's
λ-gradient is measured at the same (uniform) weights, and with `train.sampling: stratified` the batches do not depend
on the weights either: step t sees the same training and validation examples in all three runs. u and w train as
usual. Per variant and source: the standard deviation of the λ-gradient over the steps (its batch-to-batch spread),
and |mean| / standard error (the settle guard's signal-to-noise figure); per step, the cosine between a LISA
variant's λ-gradient vector and the no-LISA one on the same batch (how much of the full-model signal LISA keeps).

Decision rule, fixed in advance: `scalebio.lisa_draw: shared` becomes the default when its median per-source spread is
≤ 0.8 × the independent draw's and its mean cosine to no-LISA is not lower; otherwise the default stays
`independent`.

    python bench/lambda_gradient_spread.py --config path/to/reweight-config.yaml --steps 30 [--set model.precision=fp32]
    (e.g. the config `compare` wrote for the evidence: results/<run>/mixture/scalebio/seed-0/reweight/config.yaml)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    "lisa_independent": ["lisa.enabled=true", "scalebio.lisa_draw=independent"],
    "lisa_shared": ["lisa.enabled=true", "scalebio.lisa_draw=shared"],
    "no_lisa": ["lisa.enabled=false"],
}


def gradients(run_dir: Path) -> tuple[list[str], list[list[float]]]:
    """The λ-gradient of every step of a finished run, as (source names, [steps][sources])."""
    names, rows = None, []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "weight_gradient" in record:
            names = names or list(record["weight_gradient"])
            rows.append([record["weight_gradient"][n] for n in names])
    return names or [], rows


def run_variants(config: str, steps: int, variants: dict[str, list[str]], keep: str | None,
                 prefix: str) -> tuple[dict, dict]:
    """Run `reweight --config config` once per variant (its extra overrides) for `steps` steps with λ held at its
    initial weights (lr 0) and no checkpoints; return each variant's (names, λ-gradients per step) and seconds.
    The run directories go under `keep`, or a temporary directory removed afterwards."""
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=prefix))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                           os.environ.get("PYTHONPATH", "")]))
    results, seconds = {}, {}
    try:
        for variant, overrides in variants.items():
            out = root / variant
            shutil.rmtree(out, ignore_errors=True)
            command = [sys.executable, "-m", "lmrefinery", "reweight", "--config", config, f"output_dir={out}",
                       f"train.steps={steps}", "scalebio.lr_weights=0", "train.checkpoint_every=null",
                       "train.checkpoint_at_end=false", *overrides]
            started = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            seconds[variant] = round(time.perf_counter() - started, 1)
            if done.returncode != 0:
                sys.exit(f"{variant}: reweight failed:\n{done.stderr[-3000:]}")
            results[variant] = gradients(out)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return results, seconds


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    return dot / norm if norm > 0 else float("nan")


def summarise(names: list[str], rows: list[list[float]]) -> dict:
    columns = list(zip(*rows))
    spread = {n: statistics.stdev(c) for n, c in zip(names, columns)}
    snr = {n: abs(statistics.fmean(c)) / (statistics.stdev(c) / math.sqrt(len(c))) if statistics.stdev(c) > 0
           else float("inf") for n, c in zip(names, columns)}
    return {"median_spread": statistics.median(spread.values()), "spread": spread, "snr": snr,
            "sources_with_snr_over_3": sum(v >= 3 for v in snr.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a reweight config (YAML)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--keep", help="keep the three run directories here (default: a temporary directory)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for all three runs, e.g. model.precision=fp32")
    args = parser.parse_args()
    variants = {name: [*overrides, *args.set] for name, overrides in VARIANTS.items()}
    results, seconds = run_variants(args.config, args.steps, variants, args.keep, "lambda-spread-")
    names = results["no_lisa"][0]
    summary = {"config": args.config, "overrides": args.set, "steps": args.steps, "seconds": seconds, "variants": {}}
    for variant, (variant_names, rows) in results.items():
        assert variant_names == names, "the three runs must weigh the same sources"
        entry = summarise(names, rows)
        if variant != "no_lisa":
            cosines = [cosine(a, b) for a, b in zip(rows, results["no_lisa"][1])]
            entry["mean_cosine_to_no_lisa"] = statistics.fmean(c for c in cosines if not math.isnan(c))
        summary["variants"][variant] = entry
    independent, shared = summary["variants"]["lisa_independent"], summary["variants"]["lisa_shared"]
    ratio = shared["median_spread"] / independent["median_spread"]
    summary["shared_over_independent_spread"] = round(ratio, 3)
    summary["shared_is_better"] = bool(ratio <= 0.8 and shared["mean_cosine_to_no_lisa"]
                                       >= independent["mean_cosine_to_no_lisa"])
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
