"""Two `compare` distillation runs that differ in the students' steps, student by student: what the longer schedule
changed, paired over seeds × test items, and the training target the FIRST students learned from.

For each method and test: accuracy, mean confidence (top-1 probability) and ECE of the longer run, and its paired
differences to the shorter run (accuracy and confidence per item; ECE recomputed on every bootstrap resample of the
items) — `lmrefinery.evaluation.statistics`, scipy's bootstrap. Then the re-calibrated target's mean probability on the
top id and on the other bucket, at the answer position and at the later response positions of the training cache.

    python bench/student_steps.py results/evidence-a/final-teacher-blocks/distillation \\
        results/evidence-a/first-steps-1000/distillation
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TESTS = ("in_domain", "out_of_domain")


def per_item(directory: Path, method: str, seeds: list[int], test: str) -> list[dict]:
    rows = []
    for seed in seeds:
        result = json.loads((directory / method / f"seed-{seed}" / "result.json").read_text())
        items = result["tests"][test]["per_item"]
        rows.append({"correct": np.asarray(items["correct"], dtype=float),
                     "confidence": np.asarray(items["confidence"], dtype=float),
                     "mass": result.get("student_topk_mass")})
    return rows


def compare_students(shorter: Path, longer: Path, methods: list[str], seeds: list[int], n_bins: int) -> dict:
    from lmrefinery.evaluation.calibration import expected_calibration_error
    from lmrefinery.evaluation.statistics import paired_difference, set_metric_difference

    def interval(estimate) -> list[float]:
        return [round(estimate.value, 4), round(estimate.low, 4), round(estimate.high, 4)]

    def ece(confidence, correct) -> float:
        return expected_calibration_error(confidence, correct, n_bins)

    report = {}
    for test in TESTS:
        for method in methods:
            after, before = per_item(longer, method, seeds, test), per_item(shorter, method, seeds, test)
            report[f"{test} {method}"] = {
                "accuracy": round(float(np.mean([r["correct"].mean() for r in after])), 4),
                "confidence": round(float(np.mean([r["confidence"].mean() for r in after])), 4),
                "ece": round(float(np.mean([ece(r["confidence"], r["correct"]) for r in after])), 4),
                "student_topk_mass": [r["mass"] for r in after],
                "longer_minus_shorter": {
                    "accuracy": interval(paired_difference([r["correct"] for r in after],
                                                           [r["correct"] for r in before])),
                    "confidence": interval(paired_difference([r["confidence"] for r in after],
                                                             [r["confidence"] for r in before])),
                    "ece": interval(set_metric_difference(ece, [(r["confidence"], r["correct"]) for r in after],
                                                          [(r["confidence"], r["correct"]) for r in before]))}}
    return report


def training_target(shared: dict) -> dict:
    """The FIRST target (calibrated transform, other bucket) at the training cache's answer and later positions."""
    import torch

    from lmrefinery.distill.cache import TeacherCache
    from lmrefinery.distill.losses import teacher_distribution

    cache = TeacherCache(shared["caches"]["train"])
    summary = shared["calibration_summary"]
    answer, later, raw = [], [], []
    for index in range(cache.manifest["examples"]):
        _, logprobs, tail = cache.rows(index)
        target = teacher_distribution(logprobs, transform=summary["transform"], temperature=summary["temperature"],
                                      other_bucket=True, tail_logmass=tail)
        answer.append(target[0])
        later.append(target[1:])
        raw.append(logprobs[0].float().exp()[0])
    answer, later = torch.stack(answer), torch.cat(later)
    return {"transform": summary["transform"], "temperature": summary["temperature"],
            "teacher_top1_at_answer": round(float(torch.stack(raw).mean()), 4),
            "answer": {"top1": round(float(answer[:, 0].mean()), 4), "other": round(float(answer[:, -1].mean()), 4)},
            "later_positions": {"count": later.shape[0], "top1": round(float(later[:, 0].mean()), 4),
                                "other": round(float(later[:, -1].mean()), 4)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shorter", type=Path, help="distillation directory of the run with fewer student steps")
    parser.add_argument("longer", type=Path, help="distillation directory of the run with more student steps")
    parser.add_argument("--methods", nargs="+", default=["sft", "sft_temperature", "first"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--bins", type=int, default=10)
    args = parser.parse_args()
    shared = json.loads((args.longer / "shared.json").read_text())
    print(json.dumps({"students": compare_students(args.shorter, args.longer, args.methods, args.seeds, args.bins),
                      "training_target": training_target(shared)}, indent=1))


if __name__ == "__main__":
    main()
