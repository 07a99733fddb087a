"""A memory model for lmrefinery's commands: per-device memory of sft, reweight (full / LISA / LoRA), teacher and
distill from a Hugging Face config, checked against what this machine measures, then applied to the paper's scale.

    python bench/memory_model.py table                       # Llama-3-8B and Qwen2.5-32B on 8 × 80 GB (docs/scale.md)
    python bench/memory_model.py validate                    # predicted vs measured peak on this CPU (a few minutes)
    python bench/memory_model.py predict --config path/to/config.json --command reweight --devices 8 --lisa 2

What is counted, per device (FSDP2 shards every parameter, gradient and optimizer slot over the N devices; one shard
unit per decoder block, one for the rest):
- weights: fp32 master weights (the trainers keep fp32 weights; bf16 is autocast), ÷ N; reweight holds two copies
  (u and w) — or, with LoRA, one frozen base and two adapters; the teacher pass holds a full replica per device in
  its load dtype.
- gradients and AdamW's two moments: for the trainable parameters only — all of them; with LISA (γ blocks) the
  active blocks plus the embedding, final norm and head (state of inactive blocks is freed); with LoRA the adapters.
- FSDP2's gathered parameters: the root unit (embedding, final norm, head) stays gathered through a forward, and two
  block units are gathered at a time (the current one and the prefetched next); plus one block's unsharded gradient.
- activations saved for the backward of one micro-batch (micro_batch × length tokens), counted tensor by tensor for a
  Llama/Qwen2 block (see `saved_per_token`); with activation checkpointing, each block's input plus one block's
  activations while it is recomputed.
- the LM head's logits, which our trainers compute only at supervised positions (fp32, with their log-softmax and
  gradient).
- on CUDA, a fixed 1.5 GiB for the CUDA context, NCCL buffers and allocator slack; the table calls a setting fitting
  when the prediction is ≤ 90% of the device.

The peak is the larger of two moments: the start of the backward (all activations, the first gradients) and the
optimizer step (all gradients, plus one trainable-sized temporary of the fused AdamW update).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.process_memory import rss_bytes  # noqa: E402

GIB = 2 ** 30
CUDA_OVERHEAD = 1.5 * GIB
FIT_FRACTION = 0.9

# Published configurations (config.json of each model on the Hugging Face hub), so the table needs no download.
KNOWN = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, qkv_bias=False),
    "qwen2.5-32b": dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                        num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False, qkv_bias=True),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, qkv_bias=False),
    "random-0.5b": dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=17,
                        num_attention_heads=12, num_key_value_heads=3, tie_word_embeddings=False, qkv_bias=False),
}


@dataclass(frozen=True)
class Shape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "Shape":
        """From an HF config.json (Llama, Qwen2, Mistral and other decoder-only models of this block layout)."""
        names = {f for f in cls.__dataclass_fields__ if f != "qkv_bias"}
        missing = sorted(n for n in names if n not in config and n != "num_key_value_heads")
        if missing:
            raise SystemExit(f"config: no {missing[0]} (a Llama-style decoder config is expected)")
        values = {n: config.get(n) for n in names}
        values["num_key_value_heads"] = config.get("num_key_value_heads") or config["num_attention_heads"]
        values["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
        bias = config.get("attention_bias", config.get("model_type") == "qwen2")
        return cls(**values, qkv_bias=bool(bias))

    @property
    def kv_size(self) -> int:
        return self.hidden_size // self.num_attention_heads * self.num_key_value_heads

    def block_parameters(self) -> int:
        h, kv, i = self.hidden_size, self.kv_size, self.intermediate_size
        bias = (h + 2 * kv) if self.qkv_bias else 0
        return 2 * h * h + 2 * h * kv + bias + 3 * h * i + 2 * h

    def outside_parameters(self) -> int:
        """Embedding, final norm and (untied) head: FSDP2's root unit, always trained under LISA."""
        embedding = self.vocab_size * self.hidden_size
        return embedding + self.hidden_size + (0 if self.tie_word_embeddings else embedding)

    def parameters(self) -> int:
        return self.num_hidden_layers * self.block_parameters() + self.outside_parameters()

    def lora_parameters(self, rank: int) -> int:
        """Adapters on every linear layer of every block (q, k, v, o, gate, up, down), as `lora.enabled` does."""
        h, kv, i = self.hidden_size, self.kv_size, self.intermediate_size
        per_block = rank * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
        return self.num_hidden_layers * per_block

    def keep_layers(self, every: int) -> "Shape":
        """A keep-layers student: every `every`-th block."""
        return replace(self, num_hidden_layers=-(-self.num_hidden_layers // every))


@dataclass(frozen=True)
class Setting:
    command: str = "sft"                 # sft | reweight | teacher | distill
    devices: int = 1
    micro_batch: int = 1
    length: int = 1024
    supervised_fraction: float = 0.5    # share of positions whose next token is supervised (the head runs there)
    lisa: int = 0                       # active blocks γ (0: off)
    lora: int = 0                       # adapter rank (0: off)
    checkpointing: bool = False
    bf16: bool = True                   # autocast compute (fp32 weights); False = fp32 throughout
    teacher_bytes: int = 2              # teacher pass load dtype (bf16)
    student_every: int = 2              # distill: keep-layers student with every 2nd block
    cuda: bool = True


def saved_per_token(shape: Shape, bf16: bool, block: str = "trainable") -> float:
    """Bytes one block saves for its backward per token; `block` is "trainable", "frozen" (a block LISA left
    inactive: a linear with a frozen weight keeps no input, a norm with a frozen weight keeps only its input) or
    "lora" (frozen base weights, but every adapter keeps its linear's input).

    fp32, trainable: each RMSNorm keeps its input, the normalised values and its output (3h, twice); attention keeps
    SDPA's inputs (rotated q, and k and v expanded to every head for grouped-query attention) and output, and
    o_proj's input (5h); the MLP keeps gate, up, SiLU(gate) and their product (4i).
    bf16 autocast: the norms stay fp32; every linear keeps its own bf16 copy of its input (q, k, v, gate and up each
    cast the same tensor); SDPA's tensors and the MLP's are bf16.
    """
    h, i = shape.hidden_size, shape.intermediate_size
    if not bf16:
        elements = {"trainable": 11 * h + 4 * i, "frozen": 6 * h + 3 * i, "lora": 9 * h + 4 * i}[block]
        return 4.0 * elements
    fp32_elements = {"trainable": 4 * h, "frozen": 2 * h, "lora": 2 * h}[block]
    bf16_elements = {"trainable": 10 * h + 4 * i, "frozen": 4 * h + 3 * i, "lora": 10 * h + 4 * i}[block]
    return 4.0 * fp32_elements + 2.0 * bf16_elements


def predict(shape: Shape, setting: Setting) -> dict:
    """Per-device bytes of each component, the peak, and the checkpoint size."""
    s = setting
    if s.command == "distill":
        shape = shape.keep_layers(s.student_every)
    n = s.devices
    total = shape.parameters()
    if s.command == "teacher":  # forward only, a full replica per device, logits over the whole vocabulary
        weights = total * s.teacher_bytes
        tokens = s.micro_batch * s.length
        block_tmp = tokens * (2 * shape.hidden_size + 2 * shape.intermediate_size) * s.teacher_bytes
        logits = tokens * shape.vocab_size * (s.teacher_bytes + 4 + 4)  # logits, fp32 log-softmax, top-k search
        parts = {"weights": weights, "gradients": 0, "optimizer": 0, "fsdp_buffers": 0,
                 "activations": block_tmp, "logits": logits}
        peak = sum(parts.values()) + (CUDA_OVERHEAD if s.cuda else 0)
        return {"parameters": total, "trainable": 0, **parts, "peak": peak, "checkpoint": 0}
    copies = 2 if s.command == "reweight" else 1
    if s.lora:
        trainable = shape.lora_parameters(s.lora)
        weights = (total + copies * trainable) * 4 / n
        trainable_all = copies * trainable
        block_trainable = trainable / shape.num_hidden_layers
        outside_trainable = 0
    else:
        if s.lisa:
            trainable = min(s.lisa, shape.num_hidden_layers) * shape.block_parameters() + shape.outside_parameters()
        else:
            trainable = total
        weights = copies * total * 4 / n
        trainable_all = copies * trainable
        block_trainable = shape.block_parameters()
        outside_trainable = shape.outside_parameters()
    gradients = trainable_all * 4 / n
    optimizer = trainable_all * 8 / n
    fsdp = 0.0
    if n > 1:  # gathered units: the root for the whole forward, two blocks at a time, one block's full gradient
        fsdp = (shape.outside_parameters() + 2 * shape.block_parameters()) * 4 + block_trainable * 4
    tokens = s.micro_batch * s.length
    layers = shape.num_hidden_layers
    trainable_block = saved_per_token(shape, s.bf16, "lora" if s.lora else "trainable") * tokens
    if s.checkpointing:  # each block's input, and one block's activations while it is recomputed
        activations = layers * tokens * shape.hidden_size * 4 + trainable_block
    elif s.lisa and not s.lora:
        active = min(s.lisa, layers)
        activations = active * trainable_block + (layers - active) * saved_per_token(shape, s.bf16, "frozen") * tokens
    else:
        activations = layers * trainable_block
    supervised = tokens * s.supervised_fraction
    logits = supervised * shape.vocab_size * ((2 if s.bf16 else 0) + 4 + 4)  # (bf16,) fp32 logits, their gradient
    # first gradients of the backward: the head's (and the tied embedding's) — before the blocks' arrive
    first_gradients = outside_trainable * 4 / n if not s.lora else 0
    backward = activations + logits + first_gradients
    step = gradients + trainable_all * 4 / n  # every gradient, and the fused update's temporary
    peak = weights + optimizer + fsdp + max(backward, step) + (CUDA_OVERHEAD if s.cuda else 0)
    checkpoint = copies * (trainable * 12 if s.lora else total * 4 + trainable * 8)
    return {"parameters": total, "trainable": trainable_all, "weights": weights, "gradients": gradients,
            "optimizer": optimizer, "fsdp_buffers": fsdp, "activations": activations, "logits": logits,
            "peak": peak, "checkpoint": checkpoint}


# --- validation on this machine: the real model code, one training step pattern, peak RSS ----------------------

VALIDATION = [
    # (model, mode, micro_batch, length, checkpointing)
    ("smollm2-135m", "full", 4, 256, False),
    ("smollm2-135m", "full", 4, 256, True),
    ("smollm2-135m", "lisa", 4, 256, False),
    ("smollm2-135m", "lora", 4, 256, False),
    ("random-0.5b", "full", 2, 256, False),
    ("random-0.5b", "lisa", 2, 256, False),
    ("random-0.5b", "lora", 2, 256, False),
    ("random-0.5b", "full", 2, 256, True),
]


def measure(name: str, mode: str, micro_batch: int, length: int, checkpointing: bool, steps: int = 3) -> dict:
    """Peak RSS growth over `steps` fp32 optimizer steps of the trainers' own step function (the first step creates
    the optimizer state, the later ones run with it), relative to the process before the model exists."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmrefinery.config import LoRAConfig, ModelConfig
    from lmrefinery.data.collate import Batch
    from lmrefinery.lisa import LISA
    from lmrefinery.models import load_model
    from lmrefinery.models.loading import enable_activation_checkpointing
    from lmrefinery.models.lora import add_lora
    from lmrefinery.train.distributed import setup_distributed
    from lmrefinery.train.losses import optimizer_step
    from lmrefinery.train.optim import build_optimizer

    env = setup_distributed()
    torch.manual_seed(0)
    baseline = rss_bytes()
    if name == "smollm2-135m":
        model = load_model(ModelConfig(name_or_path="smollm2-135m-instruct"), env.device)
    else:
        values = {k: v for k, v in KNOWN[name].items() if k != "qkv_bias"}
        model = AutoModelForCausalLM.from_config(LlamaConfig(**values))
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    if mode == "lora":
        model = add_lora(model, LoRAConfig(enabled=True, r=16))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(parameters, lr=1e-5)
    lisa = LISA(model, optimizer, layers=2, interval=100) if mode == "lisa" else None
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (micro_batch, length), generator=generator)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # half the positions supervised, as the model assumes by default
    batch = Batch(ids, torch.ones_like(ids), labels, torch.zeros(micro_batch, dtype=torch.long))
    for step in range(steps):
        optimizer_step(model, optimizer, None, [batch], env, "fp32", 1.0, step)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    del lisa
    return {"peak": peak}


def validate(args) -> None:
    rows = []
    child_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                     PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                 os.environ.get("PYTHONPATH", "")]))
    for name, mode, micro_batch, length, checkpointing in VALIDATION:
        if args.only and args.only not in name:
            continue
        started = time.perf_counter()
        command = [sys.executable, __file__, "_measure", json.dumps([name, mode, micro_batch, length, checkpointing])]
        done = subprocess.run(command, env=child_env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{name} {mode}: measurement failed:\n{done.stderr[-3000:]}")
        measured = json.loads(done.stdout.strip().splitlines()[-1])["peak"]
        setting = Setting(command="sft", micro_batch=micro_batch, length=length, supervised_fraction=0.5,
                          lisa=2 if mode == "lisa" else 0, lora=16 if mode == "lora" else 0,
                          checkpointing=checkpointing, bf16=False, cuda=False)
        predicted = predict(Shape(**KNOWN[name]), setting)["peak"]
        rows.append({"model": name, "mode": mode + (" + checkpointing" if checkpointing else ""),
                     "batch": f"{micro_batch} x {length}", "predicted_mib": round(predicted / 2 ** 20),
                     "measured_mib": round(measured / 2 ** 20), "predicted_over_measured": round(predicted / measured, 3),
                     "seconds": round(time.perf_counter() - started)})
        print(json.dumps(rows[-1]), flush=True)
    worst = max(abs(r["predicted_over_measured"] - 1) for r in rows)
    print(json.dumps({"rows": len(rows), "worst_relative_error": round(worst, 3), "target": "<= 0.15"}))


# --- the table for the paper's scale ------------------------------------------------------------------------------

def _fits(shape: Shape, setting: Setting, memory: float) -> tuple[bool, dict]:
    prediction = predict(shape, setting)
    return prediction["peak"] <= FIT_FRACTION * memory, prediction


def table(args) -> None:
    memory = args.memory_gib * GIB
    print(f"| model | command | setting (per device: micro-batch × {args.length} tokens) | weights | grads | "
          f"optimizer | activations | peak / device | fits {args.devices} × {args.memory_gib:g} GiB | checkpoint |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|---:|")
    for name in ("llama-3-8b", "qwen2.5-32b"):
        shape = Shape(**KNOWN[name])
        candidates = [
            ("sft", {}), ("sft", {"checkpointing": True}), ("sft", {"lisa": 2}),
            ("reweight", {}), ("reweight", {"checkpointing": True}), ("reweight", {"lisa": 2}),
            ("reweight", {"lisa": 2, "checkpointing": True}), ("reweight", {"lora": 16}),
            ("reweight", {"lora": 16, "checkpointing": True}),
            ("teacher", {}), ("distill", {}), ("distill", {"checkpointing": True}),
        ]
        for command, extra in candidates:
            best = None
            for micro_batch in (16, 8, 4, 2, 1):
                setting = Setting(command=command, devices=args.devices, micro_batch=micro_batch, length=args.length,
                                  **extra)
                ok, prediction = _fits(shape, setting, memory)
                if ok:
                    best = (micro_batch, prediction)
                    break
            if best is None:
                prediction = predict(shape, Setting(command=command, devices=args.devices, micro_batch=1,
                                                    length=args.length, **extra))
                best = (1, prediction)
                fits = "no"
            else:
                fits = "yes"
            micro_batch, p = best
            label = ", ".join([f"micro-batch {micro_batch}"] + [
                {"checkpointing": "activation checkpointing", "lisa": f"LISA γ={extra.get('lisa')}",
                 "lora": f"LoRA r={extra.get('lora')}"}[k] for k in extra])
            print(f"| {name} | {command} | {label} | {p['weights'] / GIB:.1f} | {p['gradients'] / GIB:.1f} | "
                  f"{p['optimizer'] / GIB:.1f} | {p['activations'] / GIB:.1f} | {p['peak'] / GIB:.1f} GiB | {fits} | "
                  f"{p['checkpoint'] / GIB:.0f} GiB |")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_measure":  # a child process of `validate`
        print(json.dumps(measure(*json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    t = sub.add_parser("table")
    t.add_argument("--devices", type=int, default=8)
    t.add_argument("--memory-gib", type=float, default=80)
    t.add_argument("--length", type=int, default=1024)
    v = sub.add_parser("validate")
    v.add_argument("--only", help="models whose name contains this")
    p = sub.add_parser("predict")
    p.add_argument("--config", help="an HF config.json", default=None)
    p.add_argument("--model", choices=sorted(KNOWN), default="llama-3-8b")
    for name, default in asdict(Setting()).items():
        kind = (lambda x: x.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    args = parser.parse_args()
    if args.action == "table":
        table(args)
    elif args.action == "validate":
        validate(args)
    else:
        shape = Shape.from_config(json.loads(Path(args.config).read_text())) if args.config else Shape(**KNOWN[args.model])
        setting = Setting(**{k: getattr(args, k) for k in asdict(Setting())})
        print(json.dumps({k: (round(v / GIB, 3) if k not in ("parameters", "trainable") else v)
                          for k, v in predict(shape, setting).items()}, indent=2))


if __name__ == "__main__":
    main()
