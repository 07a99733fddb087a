"""Where an `sft` step's time goes, by operator: torch.profiler around a few steps of the real recipe (data, forward,
backward, clipping, AdamW, schedule), eager and with `model.compile: true`, in one run.

The first `--warmup` steps run unprofiled (the compile, allocator warm-up), the next `--steps` are profiled; the table
is each operator's own CPU time per profiled step, largest first. The GEMMs' share (`aten::mm`) is the floor a kernel
change cannot lower; what is left beside them is what fusion, fewer casts or a cheaper optimizer could win.

    python bench/step_profile.py --shape mcq          # SmolLM2-135M-Instruct, bf16 autocast, batch 8
    python bench/step_profile.py --shape chat --variants eager
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sft_step import make_data, make_model_dir  # noqa: E402


def profile_variant(model_dir: Path, data: Path, root: Path, args, compiled: bool) -> dict:
    from lmrefinery.config import SFTConfig, validate_config
    from lmrefinery.recipes import common, sft

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    original = common.run_loop

    def run_loop(loop, step_fn, resume):
        def step(index):
            if index == args.warmup:
                profiler.start()
            result = step_fn(index)
            if index == args.warmup + args.steps - 1:
                profiler.stop()
            return result
        return original(loop, step, resume)

    name = "compiled" if compiled else "eager"
    config = validate_config(SFTConfig, {
        "output_dir": str(root / name), "save_model": False,
        "model": {"name_or_path": str(model_dir), "precision": args.precision, "compile": compiled},
        "data": {"sources": [{"name": "data", "path": str(data)}], "max_length": args.max_length},
        "train": {"steps": args.warmup + args.steps, "batch_size": args.batch, "micro_batch_size": args.batch,
                  "lr": 1e-5, "warmup_steps": 0, "checkpoint_every": None, "checkpoint_at_end": False}})
    common.run_loop = run_loop
    try:
        sft.run(config)
    finally:
        common.run_loop = original
    averages = sorted(profiler.key_averages(), key=lambda event: -event.self_cpu_time_total)
    per_step = sum(event.self_cpu_time_total for event in averages) / args.steps / 1e6
    top = [{"operator": event.key[:80], "self_s_per_step": round(event.self_cpu_time_total / args.steps / 1e6, 4),
            "calls_per_step": round(event.count / args.steps, 1)} for event in averages[:args.top]]
    gemm = sum(event.self_cpu_time_total for event in averages if event.key == "aten::mm") / args.steps / 1e6
    return {"profiled_s_per_step": round(per_step, 3), "gemm_s_per_step": round(gemm, 3),
            "gemm_share": round(gemm / per_step, 3), "top": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--shape", choices=["mcq", "chat"], default="mcq")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--variants", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    args = parser.parse_args()
    import logging

    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_model_dir(root, args.model)
        examples = args.batch * (args.warmup + args.steps)
        reply_words = 2 if args.shape == "mcq" else 40
        data = make_data(root, examples, 40, reply_words, "chat" if args.shape == "chat" else "words")
        report = {variant: profile_variant(model_dir, data, root, args, variant == "compiled")
                  for variant in args.variants}
    print(json.dumps({"model": args.model, "shape": args.shape, "precision": args.precision, "batch": args.batch,
                      "profiled_steps": args.steps, **report}, indent=2))


if __name__ == "__main__":
    main()
