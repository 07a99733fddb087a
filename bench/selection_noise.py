"""What each mixture method's SFT set is made of, per example: how much of it is clean target data, corrupted copies
(answers replaced by "." or by another question's answer), off-domain text or other clean families — and, for the
per-example selections (LESS-style, RHO-style), how many corrupted examples a per-source weighting with the same
per-source counts would have drawn (each source's corrupted share × its count).

That last figure separates the two ways a selection can keep noise out: by choosing sources (all a mixture weighting
like ScaleBiO's can do) or by choosing examples within a source (what only a per-example score can do).

Reads a `compare` output (its data/ and mixture/<method>/seed-*/selected.jsonl); nothing is rerun.

    python bench/selection_noise.py results/evidence-a/mixture results/evidence-b/mixture
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

KINDS = ("target_clean", "corrupted", "off_domain", "other_clean")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _kind(record: dict, source: str, target: str) -> str:
    """Corrupted: a generated record whose reply is not its own answer (the builders keep the true answer)."""
    if "answer" not in record:
        return "off_domain"
    if record["messages"][-1]["content"] != record["answer"] or "original_answer" in record:
        return "corrupted"
    return "target_clean" if source == target or source.startswith(target + "_") else "other_clean"


def _data_kinds(run: Path, target: str) -> dict[str, dict[str, str]]:
    """Per source: the kind of each record, keyed by its conversation (what selected.jsonl keeps)."""
    kinds = {}
    for path in sorted((run / "data").glob("*.jsonl")):
        if path.stem.startswith(("mcq.", "target.")):  # the target's splits and the MCQ files are not pool sources
            continue
        kinds[path.stem] = {json.dumps(r["messages"]): _kind(r, path.stem, target) for r in _records(path)}
    return kinds


def _target_family(run: Path) -> str:
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    return config["data"]["mixture"]["target"]["family"]


def composition(run: Path) -> dict:
    target = _target_family(run)
    kinds = _data_kinds(run, target)
    corrupted_share = {source: sum(k == "corrupted" for k in rows.values()) / len(rows)
                       for source, rows in kinds.items()}
    report = {}
    for method_dir in sorted((run / "mixture").iterdir()):
        seeds = {}
        for seed_dir in sorted(method_dir.glob("seed-*")):
            selected = seed_dir / "selected.jsonl"
            if not selected.exists():
                continue
            rows = [r for r in _records(selected) if r["source"] != "validation"]
            counts = Counter(kinds[r["source"]][json.dumps(r["messages"])] for r in rows)
            per_source = Counter(r["source"] for r in rows)
            seeds[seed_dir.name] = {
                "examples": len(rows), **{kind: counts[kind] for kind in KINDS},
                # a weighting with these per-source counts draws each source's corrupted share of them
                "corrupted_if_drawn_per_source": round(sum(c * corrupted_share[s] for s, c in per_source.items()), 1)}
        if seeds:
            report[method_dir.name] = {"per_seed": seeds, "mean": {
                key: round(statistics.mean(row[key] for row in seeds.values()), 1)
                for key in ("examples", *KINDS, "corrupted_if_drawn_per_source")}}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="compare output directories")
    args = parser.parse_args()
    for run in args.runs:
        report = composition(run)
        print(f"## {run}\n")
        print("| method | examples | clean target | corrupted | off-domain | other clean | corrupted if drawn per "
              "source with the same counts |\n|---|---:|---:|---:|---:|---:|---:|")
        for method, row in report.items():
            mean = row["mean"]
            print(f"| {method} | {mean['examples']:g} | {mean['target_clean']:g} | {mean['corrupted']:g} | "
                  f"{mean['off_domain']:g} | {mean['other_clean']:g} | {mean['corrupted_if_drawn_per_source']:g} |")
        print()
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
