"""Memory and step time of full fine-tuning vs LISA (freeing state) vs LISA keeping state, side by side.

One run of this script measures the three modes in turn, each in a fresh child process (so each peak is its own):
the same model, batch and steps; LISA switches after every step (`interval 1`), so 10 switches happen within 11
steps. Reported per mode: optimizer-state bytes after 10 switches, peak memory, median step time.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated`; on CPU, the peak resident set size minus the resident
size measured just before the model is loaded (Python + libraries), with glibc told to return large freed blocks to
the OS at once (MALLOC_MMAP_THRESHOLD_) so that the peak tracks live tensors rather than allocator caching.

    python bench/lisa_memory.py                       # smollm2-135m-instruct, batch 1 × 256 tokens
    python bench/lisa_memory.py --model path/to/model --steps 21 --layers 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.process_memory import rss_bytes  # noqa: E402

MODES = ("full", "lisa", "lisa_keep_state")


def measure(mode: str, args) -> dict:
    import torch

    from lmrefinery.config import ModelConfig
    from lmrefinery.data.collate import Batch
    from lmrefinery.lisa import LISA
    from lmrefinery.models import load_model
    from lmrefinery.train.distributed import setup_distributed
    from lmrefinery.train.losses import optimizer_step
    from lmrefinery.train.precision import peak_memory_bytes

    env = setup_distributed()
    baseline = rss_bytes()
    model = load_model(ModelConfig(name_or_path=args.model), env.device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    lisa = None
    if mode != "full":
        lisa = LISA(model, optimizer, layers=args.layers, interval=1, keep_state=mode == "lisa_keep_state")
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, args.tokens), generator=generator)
    batch = Batch(ids, torch.ones_like(ids), ids.clone(), torch.zeros(1, dtype=torch.long)).to(env.device)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    times = []
    for step in range(args.steps):
        started = time.perf_counter()
        optimizer_step(model, optimizer, None, [batch], env, args.precision, 1.0, step)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        times.append(time.perf_counter() - started)
        if lisa is not None and step < args.steps - 1:  # measure state after the last period's step, not a switch
            lisa.step()
    state_bytes = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                      if torch.is_tensor(v))
    peak = peak_memory_bytes(env.device) - (baseline if env.device.type == "cpu" else 0)
    return {"mode": mode, "optimizer_state_bytes": state_bytes, "peak_memory_bytes": peak,
            "step_s": statistics.median(times[1:]),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "switches": lisa.switches if lisa else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=11, help="with interval 1: steps - 1 switches")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.mode:
        print("RESULT " + json.dumps(measure(args.mode, args)))
        return
    results = {}
    child_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for mode in MODES:
        command = [sys.executable, __file__, "--mode", mode] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "mode"]
        output = subprocess.run(command, env=child_env, capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(next(l for l in output.splitlines() if l.startswith("RESULT "))[7:])
    full, lisa, keep = (results[m] for m in MODES)
    summary = {
        "model": args.model, "batch": f"1 x {args.tokens}", "layers": args.layers, "switches": lisa["switches"],
        "results": results,
        "lisa_over_full": {k: round(lisa[k] / full[k], 3) for k in ("optimizer_state_bytes", "peak_memory_bytes",
                                                                     "step_s")},
        "lisa_keep_state_over_full": {k: round(keep[k] / full[k], 3) for k in ("optimizer_state_bytes",
                                                                               "peak_memory_bytes", "step_s")},
        "targets": {"optimizer_state_bytes": "<= 0.35", "peak_memory_bytes": "<= 0.6", "step_s": "<= 1.0"},
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
