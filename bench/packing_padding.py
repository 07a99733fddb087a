"""How much of a batch is padding, padded vs packed (data/packing.py), on real data with the real tokenizer.

Draws `--steps` global batches of `--batch` examples as `sft` does (proportional sampling over the given sources,
micro-batches of `--micro-batch`), collates each micro-batch padded and packed, and reports the fraction of the
forward's token positions that are padding, and the number of rows, both ways; with `--micro-batch` below `--batch`,
also the padding of the micro-batches grouped by length, as the recipes cut them (cut in the sampler's order, the
"padded" figure, is how they were cut before). No model runs: this is the work
packing can save, not its time (bench/sft_step.py --packing measures that).

    python bench/packing_padding.py --max-length 288 \
        mcq=results/evidence-a/distillation/data/mcq.train.jsonl
    python bench/packing_padding.py --max-length 192 \
        sft_set=results/evidence-a/mixture/mixture/scalebio/seed-0/selected.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", metavar="NAME=PATH")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer")
    parser.add_argument("--max-length", type=int, default=288)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import logging

    logging.disable(logging.INFO)
    from lmrefinery.config import DataConfig, ModelConfig, SamplingConfig, SourceConfig
    from lmrefinery.data.collate import collate, rank_micro_batches
    from lmrefinery.data.sampling import MixtureSampler
    from lmrefinery.data.sources import load_pool
    from lmrefinery.data.tokenize import ChatEncoder
    from lmrefinery.models.loading import load_tokenizer

    sources = [SourceConfig(name=item.split("=", 1)[0], path=item.split("=", 1)[1]) for item in args.sources]
    data = DataConfig(sources=sources, max_length=args.max_length)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=args.model))
    pool = load_pool(data.sources, ChatEncoder(tokenizer), data)
    sampler = MixtureSampler.build(SamplingConfig(strategy="proportional"), pool.names, pool.source_indices(),
                                   args.batch, args.seed)
    micro_batches = args.steps * -(-args.batch // args.micro_batch)
    lengths = pool.lengths()
    totals = {"real": 0, "padded_positions": 0, "packed_positions": 0, "grouped_positions": 0, "padded_rows": 0,
              "packed_rows": 0}
    for _ in range(args.steps):
        global_batch = sampler.next_batch()
        for indices in rank_micro_batches(global_batch, 0, 1, args.micro_batch):  # cut in the sampler's order
            batch = collate([pool.examples[i] for i in indices], tokenizer.pad_token_id, pack_rows=True)
            totals["real"] += int(batch.attention_mask.sum())
            totals["padded_positions"] += batch.input_ids.numel()
            totals["packed_positions"] += batch.packed.input_ids.numel()
            totals["padded_rows"] += batch.input_ids.shape[0]
            totals["packed_rows"] += batch.packed.input_ids.shape[0]
        for indices in rank_micro_batches(global_batch, 0, 1, args.micro_batch, lengths):  # as the recipes cut it
            totals["grouped_positions"] += len(indices) * int(max(lengths[i] for i in indices))
    print(json.dumps({
        "sources": {s.name: s.path for s in sources}, "examples": len(pool.examples), "max_length": args.max_length,
        "length": {"min": int(min(lengths)), "median": float(sorted(lengths)[len(lengths) // 2]),
                   "max": int(max(lengths))},
        "batch": args.batch, "micro_batch": args.micro_batch, "steps": args.steps,
        "padding_fraction": {"padded": round(1 - totals["real"] / totals["padded_positions"], 4),
                             "packed": round(1 - totals["real"] / totals["packed_positions"], 4),
                             "padded_grouped_by_length": round(1 - totals["real"] / totals["grouped_positions"], 4)},
        "rows_per_micro_batch": {"padded": round(totals["padded_rows"] / micro_batches, 2),
                                 "packed": round(totals["packed_rows"] / micro_batches, 2)},
        "positions_computed_packed_over_padded": round(totals["packed_positions"] / totals["padded_positions"], 4)},
        indent=2))


if __name__ == "__main__":
    main()
