"""Data at scale: drawing batches from a large pool, and loading a large source from the tokenised-pool cache.

1. Sampler: a batch of 128 drawn from a pool of `--pool` examples (default 1M) in 3 sources, for each strategy
   (proportional, weights, stratified): the median time per batch over `--batches` batches, the first batch (which
   builds the pass's permutation) reported apart; and resume exactness — a sampler restored from a JSON round trip
   of another's state after `--batches // 2` batches draws the same batches as the uninterrupted one.
   Target: ≤ 5 ms per batch.
2. Pool cache: one synthetic source of `--examples` conversations (default 1M) read and tokenised by `load_source`
   the first time (the cache is written), then loaded again from the cache, each in a fresh child process so that
   each peak RSS is its own. Target: cached load ≤ 5% of the first tokenisation's time.

    python bench/data_scale.py                                  # 1M pool, 1M examples, the tiny test tokenizer
    python bench/data_scale.py --tokenizer smollm2-135m-instruct --examples 100000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sampler_benchmark(pool: int, batch: int, batches: int) -> dict:
    from lmrefinery.config import SamplingConfig
    from lmrefinery.data.sampling import MixtureSampler

    sizes = [pool // 2, pool // 3, pool - pool // 2 - pool // 3]
    starts = [0, sizes[0], sizes[0] + sizes[1]]
    indices = [list(range(start, start + size)) for start, size in zip(starts, sizes)]
    names = ["a", "b", "c"]
    results = {}
    for strategy, weights in [("proportional", None), ("weights", {"a": 0.2, "b": 0.5, "c": 0.3}),
                              ("stratified", None)]:
        settings = SamplingConfig(strategy=strategy, weights=weights)
        sampler = MixtureSampler.build(settings, names, indices, batch, seed=0)
        times, drawn = [], []
        for _ in range(batches):
            start = time.perf_counter()
            drawn.append(sampler.next_batch())
            times.append(time.perf_counter() - start)
        interrupted = MixtureSampler.build(settings, names, indices, batch, seed=0)
        for _ in range(batches // 2):
            interrupted.next_batch()
        resumed = MixtureSampler.build(settings, names, indices, batch, seed=0)
        resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
        exact = [resumed.next_batch() for _ in range(batches - batches // 2)] == drawn[batches // 2:]
        results[strategy] = {"first_batch_ms": round(1000 * times[0], 2),
                             "median_batch_ms": round(1000 * statistics.median(times[1:]), 3),
                             "resume_exact": exact}
    return results


def write_source(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = "the model learns which data sources help the target task most while training on a mixture".split()
    with path.open("w") as handle:
        for i in range(count):
            question = f"{i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
            answer = " ".join(rng.choice(words) for _ in range(rng.randint(2, 8)))
            handle.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": answer}]}) + "\n")


def _tokenizer(name: str):
    if name == "tiny":
        from tests.tiny import tiny_tokenizer

        return tiny_tokenizer()
    from lmrefinery.config import ModelConfig
    from lmrefinery.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=name))


def load_child(args) -> dict:
    from lmrefinery.config import DataConfig, SourceConfig
    from lmrefinery.data.sources import load_source
    from lmrefinery.data.tokenize import ChatEncoder

    encoder = ChatEncoder(_tokenizer(args.tokenizer))
    data = DataConfig(sources=[SourceConfig(name="big", path=args.source)], max_length=256)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    examples, _ = load_source(data.sources[0], 0, encoder, data)
    seconds = time.perf_counter() - start
    checksum = sum(len(e.input_ids) for e in examples)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": round(seconds, 2), "examples": len(examples), "tokens": checksum,
            "peak_rss_mb": round(peak / 1024, 1), "rss_growth_mb": round((peak - before) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--examples", type=int, default=1_000_000)
    parser.add_argument("--tokenizer", default="tiny", help="'tiny' (the test suite's BPE) or a model name/alias")
    parser.add_argument("--load-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_child:
        print("RESULT " + json.dumps(load_child(args)))
        return
    report = {"sampler": {"pool": args.pool, "batch": args.batch, **sampler_benchmark(args.pool, args.batch,
                                                                                        args.batches)}}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "big.jsonl"
        write_source(source, args.examples)
        env = dict(os.environ, LMREFINERY_CACHE=str(Path(tmp) / "cache"), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        runs = []
        for _ in ("first", "cached"):
            command = [sys.executable, __file__, "--load-child", "--source", str(source), "--tokenizer", args.tokenizer]
            output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(next(l for l in output.splitlines() if l.startswith("RESULT "))[7:]))
        assert runs[0]["tokens"] == runs[1]["tokens"], "the cached pool differs from the tokenised one"
        report["pool_cache"] = {"examples": args.examples, "tokenizer": args.tokenizer, "first": runs[0],
                                "cached": runs[1],
                                "cached_over_first": round(runs[1]["seconds"] / runs[0]["seconds"], 4),
                                "source_mb": round(source.stat().st_size / 2**20, 1)}
    report["targets"] = {"median_batch_ms": "<= 5", "cached_over_first": "<= 0.05"}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
