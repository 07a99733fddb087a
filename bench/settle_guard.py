"""The settle guard (scalebio.weights_settled) recomputed on finished `reweight` runs, from their logged λ-gradients.

For every finished `reweight` run in or under the given directories (one with its weights.json; runs still going
are skipped): the top-weighted source, its mean λ-gradient and block-mean signal-to-noise over the last quarter of the
steps, the threshold, whether it is pushed up there or the weights are on a plateau (pushed up in an earlier window,
and the last window moved them less than a tenth of the way before it), and whether the run counts as settled.

    python bench/settle_guard.py results/evidence-a/mixture results/evidence-b/mixture
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+", type=Path)
    args = parser.parse_args()
    from lmrefinery.recipes.reweight import lambda_gradient_signal
    from lmrefinery.train.run_dir import read_metrics

    report = {}
    for directory in args.directories:
        for metrics in sorted(directory.glob("**/metrics.jsonl")):
            if not (metrics.parent / "weights.json").exists():  # not a reweight run, or one still going
                continue
            weights = json.loads((metrics.parent / "weights.json").read_text())["weights"]
            names = list(weights)
            signal = lambda_gradient_signal(read_metrics(metrics), names, [weights[n] for n in names])
            top = signal["top_source"]
            report[str(metrics.parent)] = {
                "top_source": top, "top_weight": round(weights[top], 3),
                "top_mean_gradient": round(signal["mean_gradient"][top], 4),
                "top_snr": round(signal["snr"][top], 2), "threshold": round(signal["threshold"], 2),
                "pushed": signal["pushed"], "earlier_push": signal["earlier_push"],
                "moved_last_window": round(signal["moved_last_window"], 4),
                "moved_before": round(signal["moved_before"], 4), "plateau": signal["plateau"],
                "settled": signal["settled"],
                "sources_above_threshold": [n for n, v in signal["snr"].items() if v >= signal["threshold"]]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
