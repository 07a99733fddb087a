"""`lmrefinery mix`: draw an SFT set of N examples from the sources with the learned weights.

Counts: ⌊N·p_i⌋ from source i, then the N − Σ⌊N·p_i⌋ examples left over go one each to the sources with the largest
fractional parts N·p_i − ⌊N·p_i⌋ (ties: config order) — the largest-remainder rule, so counts sum to N exactly.
Within a source, examples are drawn without replacement (a seeded shuffle) until the source runs out, then with
replacement (seeded). The mixture is shuffled and written as JSONL in `messages` format, with manifest.json.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from lmrefinery.baselines.mixture import draw_mixture
from lmrefinery.config import MixConfig, SamplingConfig
from lmrefinery.data.sampling import source_probabilities
from lmrefinery.data.sources import read_conversations
from lmrefinery.fileio import atomic_write_json, atomic_write_text, output_directory

log = logging.getLogger(__name__)


def run(config: MixConfig) -> Path:
    names = [s.name for s in config.data.sources]
    pools = [read_conversations(spec, config.data.on_bad_record) for spec in config.data.sources]
    weights = source_probabilities(SamplingConfig(strategy="weights", weights=config.weights), names,
                                   [len(p) for p in pools], key="weights")
    drawn, repeated = draw_mixture([len(p) for p in pools], weights, config.num_examples, config.seed)
    mixture = [{**pools[source][index], "source": names[source]} for source, index in drawn]
    manifest_sources = {}
    for index, (name, records) in enumerate(zip(names, pools)):
        count = sum(1 for source, _ in drawn if source == index)
        manifest_sources[name] = {"weight": weights[index], "count": count, "available": len(records),
                                  "without_replacement": count - repeated[index], "with_replacement": repeated[index]}
    output_dir = output_directory(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "mix.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mixture))
    floors = sum(math.floor(config.num_examples * w) for w in weights)
    atomic_write_json(output_dir / "manifest.json", {
        "num_examples": config.num_examples, "seed": config.seed, "sources": manifest_sources,
        "top_up": {"rule": "largest remainder", "examples": config.num_examples - floors},
        "weights_from": config.weights if isinstance(config.weights, str) else "inline"})
    for name, info in manifest_sources.items():
        log.info("%s: %d examples (weight %.4f; %d drawn again after the source ran out)", name, info["count"],
                 info["weight"], info["with_replacement"])
    log.info("wrote %s (%d examples) and manifest.json", output_dir / "mix.jsonl", len(mixture))
    return output_dir
