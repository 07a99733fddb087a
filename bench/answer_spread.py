"""Did a mixture method's SFT model learn the target, or learn to repeat one answer? Read from a `compare` output.

For every method and seed: exact match, how many distinct gold answers its hits cover, and the most-hit answer's
share of the hits beside that answer's share of the test set. A model that always replies the same string scores
exactly that string's base rate, with every hit on one gold answer — which exact match alone does not show.

    python bench/answer_spread.py results/evidence-b/mixture
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def spread(output_dir: Path) -> dict:
    test = [json.loads(line) for line in (output_dir / "data" / "target.test.jsonl").read_text().splitlines()]
    answers = [record["messages"][-1]["content"] for record in test]
    base_rate = collections.Counter(answers)
    report = {"test_items": len(answers), "most_common_answers": base_rate.most_common(3)}
    for result in sorted((output_dir / "mixture").glob("*/seed-*/result.json")):
        method, seed = result.parent.parent.name, result.parent.name
        hits = collections.Counter(answer for answer, hit in zip(answers, json.loads(result.read_text())[
            "per_item"]["exact_match"]) if hit)
        total = sum(hits.values())
        top, top_hits = hits.most_common(1)[0] if hits else ("", 0)
        report[f"{method}/{seed}"] = {
            "exact_match": round(total / len(answers), 3), "distinct_answers_hit": len(hits),
            "most_hit_answer": top, "its_share_of_hits": round(top_hits / total, 3) if total else None,
            "its_items_answered_right": f"{top_hits}/{base_rate[top]}" if hits else None}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="a `compare` output directory with its data/ and mixture/")
    print(json.dumps(spread(parser.parse_args().output_dir), indent=1))


if __name__ == "__main__":
    main()
