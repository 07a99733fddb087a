"""`reweight` step time and memory against `sft`, on the same model, micro-batch and batch sizes, side by side.

One run of this script runs five modes, each in a fresh child process (so each peak is its own): `sft` without
LISA, `reweight` without LISA (two full copies), `reweight` with LISA (2 layers) on both model copies, `sft` with
LoRA, and `reweight` with LoRA (u and w two adapters of one frozen base); `reweight_lisa_compiled` (on request) is
`reweight_lisa` with `model.compile: true`. The children run with `MALLOC_MMAP_THRESHOLD_=131072` so that the peaks
track live tensors; that allocator setting also slows eager steps (every large tensor a fresh mmap: 2.3 × on the
evidence's reweight shape), so step times as a user sees them, and eager-vs-compiled comparisons, need
`--default-malloc`. The step time is the median of the recipes' own `step_time_s` (first step dropped; pooled over
`--rounds`, which alternate the modes); peak memory as in bench/lisa_memory.py (CPU: peak RSS minus
RSS before loading anything; CUDA: allocator peak), taken twice: over the training steps (the peak the recipe logs
with its last step) and over the whole process, which adds the checkpoint the loop writes after the last step (the
weights and both AdamW moments of every trained model go through torch.distributed.checkpoint's safetensors writer
then). The targets are on the training peak; the checkpoint's peak is reported beside it.

Targets: reweight step / sft step ≤ 3.1 (the floor is 3 forward+backward passes: u on B, w on B, w on B_v);
peak memory of reweight with LISA / sft without LISA ≤ 1.3; with LoRA: reweight-LoRA peak / sft-LoRA peak ≤ 1.15
and reweight-LoRA step / sft-LoRA step ≤ 3.1 (reweight-LoRA peak / two-full-copies reweight peak reported).

    python bench/reweight_step.py                   # smollm2-135m-instruct, batch 4, validation batch 4
    python bench/reweight_step.py --modes sft_lora reweight_lora reweight
    python bench/reweight_step.py --modes sft_lora reweight_lora --profile 25   # where a LoRA step's time goes
    python bench/reweight_step.py --modes sft_lora reweight_lora --rounds 3 --steps 8   # drift shared by both
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.process_memory import rss_bytes  # noqa: E402

MODES = ("sft", "reweight", "reweight_lisa", "sft_lora", "reweight_lora", "reweight_lisa_compiled")
LORA = {"enabled": True, "r": 16, "alpha": 32}


def write_data(directory: Path, count: int, words: int, seed: int) -> Path:
    rng = random.Random(seed)
    vocabulary = ("the model learns which data sources help the target task most while training on a mixture of "
                  "arithmetic stories questions answers and plain English text").split()
    path = directory / f"data-{seed}.jsonl"
    with path.open("w") as handle:
        for _ in range(count):
            question = " ".join(rng.choice(vocabulary) for _ in range(words))
            answer = " ".join(rng.choice(vocabulary) for _ in range(words))
            handle.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    return path


def child(mode: str, args) -> dict:
    baseline = rss_bytes()
    from lmrefinery.config import ReweightConfig, SFTConfig, validate_config
    from lmrefinery.recipes import common as common_recipe
    from lmrefinery.recipes import reweight, sft
    from lmrefinery.train.precision import peak_memory_bytes
    from lmrefinery.train.run_dir import read_metrics

    root = Path(args.workdir)
    sources = [{"name": f"s{i}", "path": str(root / f"data-{i}.jsonl")} for i in range(3)]
    data = {"sources": sources, "max_length": args.max_length}
    model = {"name_or_path": args.model, "precision": args.precision, "compile": mode.endswith("_compiled")}
    out = root / f"{mode}-{args.round}"
    common = {"steps": args.steps, "batch_size": args.batch, "micro_batch_size": args.micro, "checkpoint_every": None}
    lora = LORA if mode.endswith("_lora") else {"enabled": False}
    profiler = _profile_steps(reweight if mode.startswith("reweight") else common_recipe) if args.profile else None
    if mode.startswith("sft"):
        config = validate_config(SFTConfig, {"output_dir": str(out), "model": model, "data": data, "lora": lora,
                                             "save_model": False, "train": {**common, "lr": 1e-5}})
        sft.run(config)
    else:
        config = validate_config(ReweightConfig, {
            "output_dir": str(out), "model": model, "data": data,
            "validation": {"sources": [{"name": "val", "path": str(root / "data-9.jsonl")}]},
            "lisa": {"enabled": mode.startswith("reweight_lisa"), "layers": 2, "interval": 2}, "lora": lora,
            "train": {**common, "val_batch_size": args.val_batch}})
        reweight.run(config)
    import torch

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    metrics = read_metrics(out / "metrics.jsonl")
    times = [m["step_time_s"] for m in metrics if "step_time_s" in m]
    before = baseline if device.type == "cpu" else 0
    # logged at each step, before the checkpoint that follows the last one: the training peak on its own
    training_peak = max(m["peak_memory_bytes"] for m in metrics if "peak_memory_bytes" in m) - before
    result = {"mode": mode, "step_times_s": times[1:], "peak_memory_bytes": training_peak,
              "peak_with_final_checkpoint_bytes": peak_memory_bytes(device) - before, "steps": len(times)}
    if profiler is not None:
        result["profile"] = _top_functions(profiler, args.profile, len(times) - 1)
    return result


def _profile_steps(recipe_module):
    """cProfile around every step but the first (warm-up): the recipe's `run_loop` gets a step function that switches
    the profiler on and off, so model loading, data and saving stay out of the figures."""
    import cProfile

    profiler = cProfile.Profile()
    original = recipe_module.run_loop

    def run_loop(loop, step_fn, resume):
        def profiled(index):
            if index == 0:
                return step_fn(index)
            profiler.enable()
            try:
                return step_fn(index)
            finally:
                profiler.disable()
        return original(loop, profiled, resume)

    recipe_module.run_loop = run_loop
    return profiler


def _top_functions(profiler, count: int, steps: int) -> list[dict]:
    """The `count` functions with the most own time (tottime) per profiled step, and their cumulative time."""
    import pstats

    entries = pstats.Stats(profiler).stats  # (file, line, name) → (calls, primitive calls, tottime, cumtime, callers)
    ranked = sorted(entries.items(), key=lambda item: item[1][2], reverse=True)[:count]
    return [{"function": f"{Path(file).name}:{line}({name})", "calls_per_step": round(calls / steps, 1),
             "own_s_per_step": round(own / steps, 4), "cumulative_s_per_step": round(cumulative / steps, 4)}
            for (file, line, name), (calls, _, own, cumulative, _) in ranked]


def _pooled(runs: list[dict]) -> dict:
    """One mode over several rounds: the median of all its measured steps, the largest of its peaks."""
    times = [t for run in runs for t in run["step_times_s"]]
    pooled = {key: max(run[key] for run in runs) for key in ("peak_memory_bytes", "peak_with_final_checkpoint_bytes")}
    pooled.update(mode=runs[0]["mode"], step_s=statistics.median(times), steps_measured=len(times))
    if "profile" in runs[0]:
        pooled["profile"] = runs[0]["profile"]
    return pooled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--val-batch", type=int, default=4)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--words", type=int, default=40)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES[:5]),
                        help="modes to run (default: all but reweight_lisa_compiled)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="cProfile every step but the first and report each mode's N functions with the most "
                             "own time per step")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the modes this many times, alternating, and pool each mode's step times: machine "
                             "drift then hits every mode alike (each round's ratios are reported too)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="run the children under glibc's default allocator (step times as a user sees them; "
                             "the peaks then include what malloc keeps cached)")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        import logging

        logging.disable(logging.INFO)
        print("RESULT " + json.dumps(child(args.mode, args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (0, 1, 2, 9):
            write_data(Path(tmp), args.batch * args.steps * 2, args.words, seed)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if not args.default_malloc:  # freed blocks go back to the OS at once: peaks track live tensors
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        rounds = []
        for round_index in range(args.rounds):
            rounds.append({})
            for mode in args.modes:
                command = [sys.executable, __file__, "--mode", mode, "--workdir", tmp, f"--round={round_index}"] + [
                    f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                    if k not in ("mode", "modes", "workdir", "round", "rounds", "default_malloc")]
                output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
                rounds[-1][mode] = json.loads(next(l for l in output.splitlines() if l.startswith("RESULT "))[7:])
    results = {mode: _pooled([one[mode] for one in rounds]) for mode in args.modes}
    ratios = {}
    for over, under in [("reweight", "sft"), ("reweight_lisa", "sft"), ("reweight_lora", "sft_lora"),
                        ("reweight_lora", "reweight"), ("sft_lora", "sft")]:
        if over in results and under in results:
            ratios[f"{over}_step_over_{under}_step"] = round(results[over]["step_s"] / results[under]["step_s"], 3)
            ratios[f"{over}_peak_over_{under}_peak"] = round(results[over]["peak_memory_bytes"]
                                                             / results[under]["peak_memory_bytes"], 3)
            ratios[f"{over}_peak_with_checkpoint_over_{under}_peak_with_checkpoint"] = round(
                results[over]["peak_with_final_checkpoint_bytes"] / results[under]["peak_with_final_checkpoint_bytes"],
                3)
    per_round = [{f"{over}_step_over_{under}_step": round(statistics.median(one[over]["step_times_s"])
                                                          / statistics.median(one[under]["step_times_s"]), 3)
                  for over, under in [("reweight", "sft"), ("reweight_lora", "sft_lora")]
                  if over in one and under in one} for one in rounds]
    print(json.dumps({
        "model": args.model, "batch": args.batch, "val_batch": args.val_batch, "micro_batch": args.micro,
        "max_length": args.max_length, "rounds": args.rounds, "results": results, "ratios": ratios,
        "step_ratios_per_round": per_round,
        "targets": {"reweight_step_over_sft_step": "<= 3.1", "reweight_lisa_peak_over_sft_peak": "<= 1.3",
                    "reweight_lora_peak_over_sft_lora_peak": "<= 1.15",
                    "reweight_lora_step_over_sft_lora_step": "<= 3.1"}}, indent=2))


if __name__ == "__main__":
    main()
