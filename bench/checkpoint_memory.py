"""Host memory and wall time of a checkpoint save and load: sharded (what the trainers write) vs gathered (the format
before December 2026), 2 processes, side by side in one run.

A random Llama-shaped model large enough that its state dominates (default 0.52 B parameters, fp32, AdamW state
present after one optimizer step), sharded with FSDP2 over 2 processes (gloo on CPU, nccl on GPUs). Each format runs
in a fresh torchrun job, so each peak is its own. Per rank: the bytes of its own shard of the state (weights + Adam
moments), the peak growth of its resident set during the save and during the load (sampled every 2 ms by a thread,
relative to the resident size just before), and the wall time of each. The load starts, as a resume does, from the
model and an optimizer without state, so its growth includes the optimizer state it restores (2/3 of the shard).

    python bench/checkpoint_memory.py                        # 0.52 B parameters; ~13 GB of host memory at the peak
    python bench/checkpoint_memory.py --hidden 512 --layers 4  # a quick look

Target (issue #26): each rank's growth during a sharded save ≤ 1.3 × its own shard of the state. The gathered save
puts the whole state on rank 0, so its growth there is ≈ 2 × the rank's shard at 2 processes and N × at N.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.process_memory import rss_bytes  # noqa: E402

FORMATS = ("sharded", "gathered")


class PeakRSS:
    """The largest resident set seen while the block runs, sampled by a thread, minus the size on entry."""

    def __enter__(self):
        _release_free_memory()
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.started = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.started
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.growth = self.peak - self.start


def _release_free_memory() -> None:
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the allocator keeps what it keeps
        pass


def build(args, env):
    """A random model, sharded, with Adam state: each rank materialises only its own shard."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmrefinery.train.distributed import shard_model

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads // 4, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shard_model(model, env)
    model.to_empty(device=env.device)
    generator = torch.Generator(device=env.device).manual_seed(env.rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    with torch.no_grad():
        for parameter in model.parameters():
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
            local.normal_(0.0, 0.02, generator=generator)
            parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # creates both moments for every parameter
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def local_bytes(model, optimizer) -> dict:
    import torch

    def local(tensor):
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    weights = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    moments = sum(local(v).numel() * local(v).element_size() for state in optimizer.state.values()
                  for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    parameters = sum(p.numel() for p in model.parameters())
    return {"parameters": parameters, "weights_bytes": weights, "optimizer_bytes": moments,
            "shard_bytes": weights + moments}


def gathered_save(directory: Path, model, optimizer, env) -> None:
    """The format before December 2026: full model and optimizer state gathered to rank 0 (CPU), written by it."""
    import torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from lmrefinery.train.distributed import barrier

    gather = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=gather)
    slots = get_optimizer_state_dict(model, optimizer, options=gather)
    if env.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))
        torch.save(slots, directory / "model-optimizer.pt")
    del weights, slots
    barrier(env)


def gathered_load(directory: Path, model, optimizer, env) -> None:
    """Its load: rank 0 reads the whole state, which is broadcast and resharded."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    weights = load_file(str(directory / "model.safetensors")) if env.is_main else {}
    slots = torch.load(directory / "model-optimizer.pt", weights_only=True) if env.is_main else {}
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, slots, options=options)


def measure(form: str, args) -> dict:
    from lmrefinery.train.checkpoint import save_checkpoint
    from lmrefinery.train.checkpoint_load import load_checkpoint
    from lmrefinery.train.distributed import all_gather_object, barrier, setup_distributed

    env = setup_distributed()
    model, optimizer = build(args, env)
    sizes = local_bytes(model, optimizer)
    run_dir = Path(args.directory)
    _release_free_memory()
    resident = rss_bytes()  # the process with its model and optimizer, before the checkpoint
    barrier(env)
    with PeakRSS() as save:
        if form == "sharded":
            save_checkpoint(run_dir, 1, env, {"model": model}, {"model": (model, optimizer)}, {}, keep_last=1)
        else:
            gathered_save(run_dir / "gathered", model, optimizer, env)
    # Resuming starts from a freshly built model and an optimizer without state: measure the load from there.
    import torch

    del optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    barrier(env)
    with PeakRSS() as load:
        if form == "sharded":
            load_checkpoint(run_dir / "checkpoints" / "step-1", env, {"model": model}, {"model": (model, optimizer)})
        else:
            gathered_load(run_dir / "gathered", model, optimizer, env)
    barrier(env)
    files = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
    mine = {**sizes, "resident_before_bytes": resident, "save_growth_bytes": save.growth, "save_s": save.seconds,
            "load_growth_bytes": load.growth, "load_s": load.seconds}
    ranks = all_gather_object(mine, env)
    return {"format": form, "ranks": ranks, "checkpoint_bytes": files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=17)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--format", choices=FORMATS, help=argparse.SUPPRESS)  # a torchrun child
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.format:
        result = measure(args.format, args)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result))
        return
    results = {}
    child_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                     OMP_NUM_THREADS="1",
                     PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                 os.environ.get("PYTHONPATH", "")]))
    shape = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("format", "directory", "processes")]
    for form in FORMATS:
        directory = Path(tempfile.mkdtemp(prefix=f"checkpoint-memory-{form}-"))
        try:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(args.processes), __file__, "--format", form, "--directory", str(directory), *shape]
            done = subprocess.run(command, env=child_env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{form}: the torchrun job failed:\n{done.stderr[-3000:]}")
            results[form] = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))[7:])
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    gib = 2 ** 30
    rows = []
    for form in FORMATS:
        for rank, r in enumerate(results[form]["ranks"]):
            rows.append({"format": form, "rank": rank, "shard_gib": round(r["shard_bytes"] / gib, 3),
                         "resident_before_gib": round(r["resident_before_bytes"] / gib, 3),
                         "save_growth_gib": round(r["save_growth_bytes"] / gib, 3),
                         "save_growth_over_shard": round(r["save_growth_bytes"] / r["shard_bytes"], 3),
                         "save_s": round(r["save_s"], 2),
                         "load_growth_gib": round(r["load_growth_bytes"] / gib, 3),
                         "load_growth_over_shard": round(r["load_growth_bytes"] / r["shard_bytes"], 3),
                         "load_s": round(r["load_s"], 2)})
    summary = {"parameters": results["sharded"]["ranks"][0]["parameters"], "processes": args.processes,
               "checkpoint_gib": {f: round(results[f]["checkpoint_bytes"] / gib, 3) for f in FORMATS},
               "rows": rows, "target": "sharded save_growth_over_shard <= 1.3 on every rank"}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
