"""Data at scale: drawing batches from a large pool, and loading a large source from the tokenised-pool cache.

1. Sampler: a batch of 128 drawn from a pool of `--pool` examples (default 1M) in 3 sources, for each strategy
   (proportional, weights, stratified): the median time per batch over `--batches` batches, the first batch (which
   builds the pass's permutation) reported apart; and resume exactness — a sampler restored from a JSON round trip
   of another's state after `--batches // 2` batches draws the same batches as the uninterrupted one.
   Target: ≤ 5 ms per batch.
2. Pool: one synthetic source of `--examples` conversations (default 1M) read and tokenised by `load_source` the
   first time (the cache is written), then loaded again from the cache; after each load, 50 batches of `--batch`
   drawn and collated from it. Each load runs in a fresh child process, so that each peak RSS is its own. With
   `--baseline REV`, the same child runs on a worktree of REV (the code a change replaces), in the same run.
   Targets: first load ≥ 5,000 examples/s; peak RSS of the cached load ≤ 2 GB at 10M examples; a batch ≤ 5 ms.

    python bench/data_scale.py --baseline 11a89f3                 # 1M pool, 1M examples, the tiny test tokenizer
    python bench/data_scale.py --examples 10000000 --pool 10000000  # 10M (the old pool would need ~77 GB)
    python bench/data_scale.py --tokenizer smollm2-135m-instruct --examples 100000
    python bench/data_scale.py --examples 200000 --pool 1000000 --num-proc 2   # also tokenising in 2 workers
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



def _import_from(root: Path) -> None:
    """Import lmrefinery (and the tests' tiny tokenizer) from `root`'s checkout, ahead of any installed copy."""
    sys.path[:0] = [str(root / "src"), str(root)]


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
    """Load the source (tokenise + write the cache, or read the cache), then draw and collate batches from it. Runs
    under the code on PYTHONPATH — this checkout's, or the baseline's — so it uses only what both provide."""
    from lmrefinery.config import DataConfig, SamplingConfig, SourceConfig
    from lmrefinery.data.collate import collate
    from lmrefinery.data.sampling import MixtureSampler
    from lmrefinery.data.sources import load_source
    from lmrefinery.data.tokenize import ChatEncoder

    encoder = ChatEncoder(_tokenizer(args.tokenizer))
    data = DataConfig(sources=[SourceConfig(name="big", path=args.source)], max_length=256,
                      **({"num_proc": args.num_proc} if args.num_proc > 1 else {}))
    before = _own_peak_kib()
    start = time.perf_counter()
    examples, _ = load_source(data.sources[0], 0, encoder, data)
    seconds = time.perf_counter() - start
    lengths = examples.lengths() if hasattr(examples, "lengths") else [len(e.input_ids) for e in examples]
    tokens = int(sum(lengths))
    sampler = MixtureSampler.build(SamplingConfig(strategy="proportional"), ["big"], [range(len(examples))],
                                   args.batch, seed=0)
    draws, collations = [], []
    for _ in range(51):
        begin = time.perf_counter()
        indices = sampler.next_batch()
        drawn = time.perf_counter()
        collate([examples[i] for i in indices], 0)
        draws.append(drawn - begin)
        collations.append(time.perf_counter() - drawn)
    peak = _own_peak_kib()
    return {"seconds": round(seconds, 2), "examples_per_s": round(len(examples) / seconds), "examples": len(examples),
            "tokens": tokens, "first_batch_ms": round(1000 * draws[0], 1),
            "median_batch_ms": round(1000 * statistics.median(draws[1:]), 2),
            "median_collate_ms": round(1000 * statistics.median(collations[1:]), 2),
            "peak_rss_mb": round(peak / 1024, 1), "rss_growth_mb": round((peak - before) / 1024, 1),
            # with num_proc > 1: the largest tokenising worker's own peak (each worker holds one encoder and a batch)
            "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def _own_peak_kib() -> int:
    """This process's own peak RSS (VmHWM). Not getrusage's ru_maxrss: on Linux a child starts with its parent's
    ru_maxrss, so after the 10M-pool sampler benchmark (≈ 1 GB in the parent) every child reported that figure."""
    from process_memory import status_kib

    if "VmHWM" in (status := status_kib()):
        return status["VmHWM"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc: macOS, whose ru_maxrss is in bytes
    return peak // 1024 if sys.platform == "darwin" else peak


def _baseline_checkout(revision: str, directory: Path) -> Path:
    """A detached worktree of `revision` (the code this change replaces), measured in the same run."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(directory), revision], check=True,
                   capture_output=True)
    return directory


def pool_benchmark(args, tmp: Path, code: dict[str, Path]) -> dict:
    """For each code version: the first load (read, tokenise, write its cache) and the cached load, each in a fresh
    child process so that each peak RSS is its own; every version gets its own cache directory."""
    source = tmp / "big.jsonl"
    write_source(source, args.examples)
    report = {"examples": args.examples, "tokenizer": args.tokenizer,
              "source_mb": round(source.stat().st_size / 2**20, 1)}
    variants = [(name, src, 1) for name, src in code.items()]
    if args.num_proc > 1:  # this checkout again, tokenising in worker processes (the baseline has no such option)
        variants.insert(1, (f"this-num_proc-{args.num_proc}", code["this"], args.num_proc))
    for name, src, processes in variants:
        env = dict(os.environ, LMREFINERY_CACHE=str(tmp / f"cache-{name}"), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        runs = {}
        for load in ("first", "cached"):
            command = [sys.executable, __file__, "--load-child", "--code-root", str(src), "--source", str(source),
                       "--tokenizer", args.tokenizer, "--batch", str(args.batch), "--num-proc", str(processes)]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                runs[load] = {"failed": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
                continue
            runs[load] = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))[7:])
        report[name] = runs
    tokens = {run["tokens"] for name, _, _ in variants for run in report[name].values() if "tokens" in run}
    assert len(tokens) <= 1, f"the versions' pools differ: token counts {tokens}"
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--examples", type=int, default=1_000_000)
    parser.add_argument("--tokenizer", default="tiny", help="'tiny' (the test suite's BPE) or a model name/alias")
    parser.add_argument("--baseline", help="a git revision whose data code is measured beside this checkout's")
    parser.add_argument("--num-proc", type=int, default=1,
                        help="also load with data.num_proc = N (tokenising in N worker processes)")
    parser.add_argument("--code-root", help=argparse.SUPPRESS)  # the checkout a child process imports
    parser.add_argument("--load-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _import_from(Path(args.code_root) if args.code_root else Path(__file__).resolve().parents[1])
    if args.load_child:
        print("RESULT " + json.dumps(load_child(args)))
        return
    report = {"sampler": {"pool": args.pool, "batch": args.batch, **sampler_benchmark(args.pool, args.batch,
                                                                                        args.batches)}}
    with tempfile.TemporaryDirectory() as tmp:
        code = {"this": Path(__file__).resolve().parents[1]}
        if args.baseline:
            code["baseline"] = _baseline_checkout(args.baseline, Path(tmp) / "baseline")
        try:
            report["pool"] = pool_benchmark(args, Path(tmp), code)
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(code["this"]), "worktree", "remove", "--force",
                                str(code["baseline"])], capture_output=True)
    report["targets"] = {"median_batch_ms": "<= 5", "cached peak_rss_mb at 10M examples": "<= 2048",
                         "first examples_per_s": ">= 5000"}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
