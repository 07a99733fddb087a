"""Where a cached pool's memory goes: resident memory after each stage of loading a source from the tokenised-pool
cache and drawing batches from it, split into anonymous memory (the process's own arrays) and file pages (the cache
file mapped into the process), for this checkout and optionally a baseline revision, each in a fresh process.

Stages: imports, load (from the cache), lengths (every example's token count), sampler (proportional, batch
`--batch`), batches (`--batches` batches drawn, their examples read and collated). The source is written (the
synthetic conversations of bench/data_scale.py) and tokenised once into `--cache` if it is not there; the figures are
from the cached loads only. Peak = VmHWM (the process's peak RSS).

    python bench/pool_rss.py --examples 1000000 --work /tmp/pool-1m --baseline HEAD~1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _memory() -> dict:
    """Peak and current RSS and its anonymous / file-backed parts, in MB (Linux /proc)."""
    from process_memory import status_kib

    fields = {key: round(value / 1024) for key, value in status_kib().items()}
    return {"peak_mb": fields["VmHWM"], "rss_mb": fields["VmRSS"], "anon_mb": fields["RssAnon"],
            "file_mb": fields["RssFile"]}


def child(args) -> dict:
    sys.path[:0] = [str(Path(args.code_root) / "src"), str(Path(args.code_root)), str(Path(__file__).parent)]
    stages = {}
    from data_scale import _tokenizer
    from lmrefinery.config import DataConfig, SamplingConfig, SourceConfig
    from lmrefinery.data.collate import collate
    from lmrefinery.data.sampling import MixtureSampler
    from lmrefinery.data.sources import load_source
    from lmrefinery.data.tokenize import ChatEncoder

    encoder = ChatEncoder(_tokenizer(args.tokenizer))
    data = DataConfig(sources=[SourceConfig(name="big", path=args.source)], max_length=256)
    stages["imports"] = _memory()
    start = time.perf_counter()
    examples, _ = load_source(data.sources[0], 0, encoder, data)
    stages["load"] = {**_memory(), "seconds": round(time.perf_counter() - start, 2), "examples": len(examples)}
    tokens = int(examples.lengths().sum())
    stages["lengths"] = {**_memory(), "tokens": tokens}
    sampler = MixtureSampler.build(SamplingConfig(strategy="proportional"), ["big"], [range(len(examples))],
                                   args.batch, seed=0)
    stages["sampler"] = _memory()
    times = []
    for _ in range(args.batches):
        indices = sampler.next_batch()
        begin = time.perf_counter()
        collate([examples[i] for i in indices], 0)
        times.append(time.perf_counter() - begin)
    stages["batches"] = {**_memory(), "median_read_and_collate_ms": round(1000 * statistics.median(times[1:]), 2)}
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1_000_000)
    parser.add_argument("--work", required=True, help="a directory kept between runs: the source and its cache")
    parser.add_argument("--tokenizer", default="tiny")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=51)
    parser.add_argument("--baseline", help="a git revision measured beside this checkout, in the same run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code-root", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from data_scale import _baseline_checkout, write_source

    root = Path(__file__).resolve().parents[1]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source, size = work / "big.jsonl", work / "examples.txt"  # one work directory per size
    if size.exists() and int(size.read_text()) != args.examples:
        sys.exit(f"{work} holds a source of {size.read_text()} examples, not {args.examples}: use another --work")
    if not source.exists():
        write_source(source, args.examples)
    size.write_text(str(args.examples))
    env = dict(os.environ, LMREFINERY_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        code = {"this": root}
        if args.baseline:
            code["baseline"] = _baseline_checkout(args.baseline, Path(tmp) / "baseline")
        report = {"examples": args.examples, "tokenizer": args.tokenizer, "batch": args.batch,
                  "batches": args.batches}
        try:
            for name, code_root in code.items():
                command = [sys.executable, __file__, "--child", "--code-root", str(code_root), "--source",
                           str(source), "--tokenizer", args.tokenizer, "--batch", str(args.batch), "--batches",
                           str(args.batches), "--work", str(work)]
                # the first child of the first version tokenises and writes the cache; every version is then
                # measured on a cached load (the cache format is the same across these versions)
                if not (work / "cache").exists():
                    subprocess.run(command, env=env, check=True, capture_output=True)
                done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
                report[name] = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))[7:])
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(code["baseline"])],
                               capture_output=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
