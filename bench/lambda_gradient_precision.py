"""Is ScaleBiO's λ-gradient above the rounding noise of its compute precision? The same `reweight` config run four
times — bf16 autocast and fp32, each with two attention kernels that agree to 1e-5 in fp32 (eager, SDPA) — through
the real command, on the same batches, in one run.

The λ-gradient is built from differences of nearly equal losses, ℓ_k(w) − ℓ_k(u), of two models a few small steps
apart. If those differences sit below the precision's rounding noise, swapping one exact kernel for another changes
the λ-gradient as much as the data do. Per precision and step: the cosine between the eager and the SDPA run's
λ-gradient vectors (1 = the kernel does not matter), how many sources' signs agree, and the norm; and per step the
cosine between the bf16 and the fp32 λ-gradient (eager both): how much of the fp32 signal bf16 keeps. λ's learning
rate is set to 0 so that every step's λ-gradient is taken at the same (uniform) weights in all four runs; with
`train.sampling: stratified` the batches are the same too.

    python bench/lambda_gradient_precision.py --config path/to/reweight-config.yaml --steps 4
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lambda_gradient_spread import cosine, run_variants  # noqa: E402

RUNS = {f"{precision}-{kernel}": [f"model.precision={precision}", f"model.attn_implementation={kernel}"]
        for precision in ("bf16", "fp32") for kernel in ("eager", "sdpa")}


def compare_steps(a: list[list[float]], b: list[list[float]]) -> list[dict]:
    """Per step (the first, taken at identical u and w, has a zero λ-gradient and is left out)."""
    rows = []
    for step, (x, y) in enumerate(zip(a, b), start=1):
        if step == 1:
            continue
        rows.append({"step": step, "cosine": round(cosine(x, y), 3),
                     "signs_agree": sum((p > 0) == (q > 0) for p, q in zip(x, y)),
                     "norm_a": float(f"{math.sqrt(sum(p * p for p in x)):.3g}"),
                     "norm_b": float(f"{math.sqrt(sum(q * q for q in y)):.3g}")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a reweight config (YAML)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--keep", help="keep the four run directories here (default: a temporary directory)")
    args = parser.parse_args()
    runs, seconds = run_variants(args.config, args.steps, RUNS, args.keep, "lambda-precision-")
    results = {run: rows for run, (_, rows) in runs.items()}
    summary = {"config": args.config, "steps": args.steps, "seconds": seconds}
    for precision in ("bf16", "fp32"):
        rows = compare_steps(results[f"{precision}-eager"], results[f"{precision}-sdpa"])
        summary[f"{precision}_eager_vs_sdpa"] = {
            "per_step": rows, "mean_cosine": round(statistics.fmean(r["cosine"] for r in rows), 3)}
    rows = compare_steps(results["bf16-eager"], results["fp32-eager"])
    summary["bf16_vs_fp32_eager"] = {"per_step": rows,
                                     "mean_cosine": round(statistics.fmean(r["cosine"] for r in rows), 3)}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
