"""Step time of `lmrefinery sft` against the trainers users would otherwise pick — TRL's `SFTTrainer` and the Hugging
Face Trainer — on the same model, data and batch, at the same precision, side by side in one run.

Every run goes through its whole training loop (data, forward, backward, clipping, AdamW, schedule, logging); the
per-step wall time is taken between consecutive step ends, the first `--warmup` steps dropped, and the median
compared. The runs alternate for `--rounds` rounds in one process so that machine noise hits all alike.

`--precision bf16` (the comparison a user makes): bf16 autocast over fp32 master weights in every trainer (TRL and
the HF Trainer with `bf16=True`; lmrefinery `model.precision: bf16`). TRL runs with prompt-completion records
(loss on the completion only, as ours) and padded batches: its packing measured slower on this CPU, and
padding-free batches need FlashAttention, which CPUs lack. The bench also measures this machine's bf16 (or fp32)
GEMM throughput (a 2048² matmul on the threads torch uses) in the same run and reports each trainer's fraction of
it: 6 × non-embedding parameters × tokens per second / peak (attention's own FLOPs left out, so a lower bound).
It also reports the same FLOPs against the rate this machine reaches at the step's own GEMM shapes
(`step_gemm_gflops`, `fraction_of_step_gemm_rate`: every decoder linear layer's forward and backward products at
batch × mean tokens rows) — on CPUs with matrix units (AMX) the square product is several times faster than these
skinny ones — and the machine it ran on (`environment`: CPU model, kernel flags, library versions).

Shapes: `--shape mcq` (multiple-choice-like: a question and a two-word reply) and `--shape chat` (the evidence's
reasoning-gym families and KJV passages, as `compare` builds them).

`--packing` adds lmrefinery with `train.packing: true` (examples several to a row, exact; docs/sft.md#packing).
`--previous` adds lmrefinery with the kernels it used before 2026-12-05 (SDPA attention, multi-tensor AdamW), for a
before / after in one run; `--anchor-attention eager` gives the HF Trainer and TRL the eager attention that
lmrefinery's `attn_implementation: auto` picks for short rows on CPU (their default is SDPA). `--micro N` adds
lmrefinery with the batch split into micro-batches of N, grouped by length (what it does whenever a batch is split)
and cut in the sampler's order (`ungrouped`), so the grouping's effect is measured apart from the split's.

`--compile` adds lmrefinery with `model.compile: true` (each decoder block through torch.compile); the steps timed
exclude the first, and `first_step_s_per_round` shows set-up plus the first step — where the compile goes (the first
round compiles cold unless inductor's on-disk cache already holds the graphs). `--no-anchors` runs lmrefinery's
variants alone (no HF Trainer, no TRL), e.g. to alternate the compiled and eager steps over more rounds; each
variant's median per round is printed too.

`--levers` also measures lmrefinery with its speed levers switched off and on one at a time: the LM head applied at
every position (`full-logits`, how it was before) vs only where a label exists (`head-at-labels`), and fp32 vs bf16
autocast.

    python bench/sft_step.py --model smollm2-135m-instruct --precision bf16 --shape mcq --trl
    python bench/sft_step.py --model smollm2-135m-instruct --precision bf16 --shape chat --trl
    python bench/sft_step.py                                  # a random 6-layer Llama of ≈ 20M parameters, fp32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmrefinery.environment import describe  # noqa: E402


def make_model_dir(root: Path, name: str) -> Path:
    if name != "random-llama-20m":
        from lmrefinery.models import resolve_model_path

        return Path(resolve_model_path(name))
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    directory = root / "model"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_data(root: Path, examples: int, length_words: int, reply_words: int, shape: str = "words") -> Path:
    import random

    path = root / "data.jsonl"
    if shape == "chat":
        from lmrefinery.data.builders import kjv_records, reasoning_gym_records

        families = [("letter_counting", {}), ("basic_arithmetic", {"max_digits": 1}), ("gcd", {}),
                    ("leg_counting", {}), ("syllogism", {})]
        share = -(-examples // (len(families) + 1))
        records = [r for task, settings in families for r in reasoning_gym_records(task, share, 0, **settings)]
        records += kjv_records(share, 0)
        random.Random(0).shuffle(records)
        path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records[:examples]))
        return path
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog two plus three is five capital of France Paris".split()
    with path.open("w") as handle:
        for _ in range(examples):
            question = " ".join(rng.choice(words) for _ in range(length_words))
            answer = " ".join(rng.choice(words) for _ in range(reply_words))
            handle.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    return path


def fastest_matmul_s(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    """The best of `repeats` timed products a @ b, after one untimed (kernel selection, caches)."""
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return best


def gemm_peak_flops(precision: str, size: int = 2048, repeats: int = 10) -> float:
    """This machine's matmul throughput (FLOP/s) at the training precision: the best of `repeats` timed products."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size ** 3 / fastest_matmul_s(a, b, repeats)


def step_gemm_flops(model_dir: Path, tokens: int, precision: str, repeats: int = 5) -> float:
    """The matmul throughput (FLOP/s) this machine reaches at the step's own GEMM shapes: for every distinct linear
    layer of the decoder blocks, the forward product [tokens, in] × [in, out] and the two backward ones (input and
    weight gradients), each the best of `repeats`, weighted by how often the blocks hold that layer. On CPUs with
    matrix units (AMX) a 2048² product runs several times faster than these skinny ones, so the square peak alone
    would understate what any trainer can reach here. The rows are the batch's real tokens (no padding), one
    micro-batch of the whole batch: a `--micro` variant's smaller products are not what this rate measures."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    shapes: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings():
            shape = (module.in_features, module.out_features)
            shapes[shape] = shapes.get(shape, 0) + 1
    del model
    flops = seconds = 0.0
    for (fan_in, fan_out), count in shapes.items():
        x = torch.randn(tokens, fan_in, dtype=dtype)
        w = torch.randn(fan_out, fan_in, dtype=dtype)  # nn.Linear's layout: the forward multiplies by its transpose
        grad = torch.randn(tokens, fan_out, dtype=dtype)
        # the output, the input's gradient, the weight's gradient
        spent = sum(fastest_matmul_s(left, right, repeats) for left, right in ((x, w.T), (grad, w), (grad.T, x)))
        flops += count * 3 * 2 * tokens * fan_in * fan_out
        seconds += count * spent
    return flops / seconds


def _full_logits(model, batch, precision):
    """The path before the head-at-labels lever: logits at every position, then the labelled ones selected."""
    from lmrefinery.train.losses import ResponseLogits, autocast

    with autocast(precision, batch.input_ids.device):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    targets = batch.labels[:, 1:]
    mask = targets != -100
    return ResponseLogits(logits[:, :-1][mask], targets[mask], mask)


def lmrefinery_step_times(model_dir: Path, data: Path, root: Path, args, round_index: int,
                          variant: str = "fp32/head-at-labels") -> list[float]:
    from lmrefinery.config import SFTConfig, validate_config
    from lmrefinery.recipes import sft
    from lmrefinery.train import losses
    from lmrefinery.train.run_dir import read_metrics

    from lmrefinery.train import optim, supervised

    precision, head, *flags = variant.split("/")
    original, original_kernel = losses.response_logits, optim._adamw_kernel
    original_split = supervised.rank_micro_batches
    micro = next((int(flag[len("micro"):]) for flag in flags if flag.startswith("micro")), args.batch)
    if "ungrouped" in flags:  # the same micro-batches cut in the sampler's order, not grouped by length
        supervised.rank_micro_batches = lambda batch, rank, world, size, lengths=None: original_split(
            batch, rank, world, size)
    if head == "full-logits":
        losses.response_logits = _full_logits
    model = {"name_or_path": str(model_dir), "precision": precision}
    if "previous-kernels" in flags:  # before 2026-12-05: SDPA attention, multi-tensor (foreach) AdamW
        model["attn_implementation"] = "sdpa"
    if "compiled" in flags:
        model["compile"] = True
        optim._adamw_kernel = lambda params: {"foreach": True}
    out = root / f"lmrefinery-{round_index}-{variant.replace('/', '-')}"
    config = validate_config(SFTConfig, {
        "output_dir": str(out), "model": model,
        "data": {"sources": [{"name": "data", "path": str(data)}], "max_length": args.max_length},
        "sampling": {"strategy": "proportional"}, "save_model": False,
        "train": {"steps": args.steps, "batch_size": args.batch, "micro_batch_size": micro, "lr": 1e-5,
                  "warmup_steps": 0, "checkpoint_every": 10 ** 6, "keep_last": 1, "packing": "packed" in flags}})
    started = time.time()
    try:
        sft.run(config)
    finally:
        losses.response_logits, optim._adamw_kernel = original, original_kernel
        supervised.rank_micro_batches = original_split
    times = [m["time"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    FIRST_STEP_S.setdefault(variant, []).append(round(times[0] - started, 1))  # set-up + step 1 (+ the compile)
    return [b - a for a, b in zip(times, times[1:])]


FIRST_STEP_S: dict[str, list[float]] = {}


def _tokenized(model_dir: Path, data: Path, args):
    """The examples as lmrefinery tokenises them (response-only labels): what the HF Trainer is fed."""
    from transformers import AutoTokenizer

    from lmrefinery.config import DataConfig, SourceConfig
    from lmrefinery.data.sources import load_pool
    from lmrefinery.data.tokenize import ChatEncoder

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    data_config = DataConfig(sources=[SourceConfig(name="data", path=str(data))], max_length=args.max_length)
    pool = load_pool(data_config.sources, ChatEncoder(tokenizer), data_config)
    return tokenizer, [{"input_ids": e.input_ids, "labels": e.labels} for e in pool.examples]


class _StepClock:
    def __init__(self):
        from transformers import TrainerCallback

        ends = self.ends = []

        class Clock(TrainerCallback):
            def on_step_end(self, *_, **__):
                ends.append(time.time())

        self.callback = Clock()

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def _common_arguments(root: Path, name: str, args) -> dict:
    return dict(output_dir=str(root / name), max_steps=args.steps, per_device_train_batch_size=args.batch,
                learning_rate=1e-5, lr_scheduler_type="cosine", max_grad_norm=1.0, optim="adamw_torch",
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                dataloader_num_workers=0, disable_tqdm=True, seed=0, bf16=args.precision == "bf16")


ANCHOR_ATTENTION = "sdpa"  # transformers' default; --anchor-attention eager gives the anchors our CPU kernel


def _fp32_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=ANCHOR_ATTENTION)


def hf_trainer_step_times(model_dir: Path, data: Path, root: Path, args, round_index: int) -> list[float]:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer, dataset = _tokenized(model_dir, data, args)
    clock = _StepClock()
    trainer = Trainer(model=_fp32_model(model_dir), args=TrainingArguments(**_common_arguments(
        root, f"hf-{round_index}", args)), train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), callbacks=[clock.callback])
    trainer.train()
    return clock.step_times()


def trl_step_times(model_dir: Path, data: Path, root: Path, args, round_index: int) -> list[float]:
    """TRL's SFTTrainer on the same conversations as prompt-completion records (loss on the completion only)."""
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line)["messages"] for line in data.read_text().splitlines()]
    dataset = datasets.Dataset.from_list([{"prompt": messages[:-1], "completion": messages[-1:]}
                                          for messages in rows])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    clock = _StepClock()
    config = SFTConfig(**_common_arguments(root, f"trl-{round_index}", args), max_length=args.max_length,
                       packing=False, padding_free=False, completion_only_loss=True, dataset_num_proc=None)
    trainer = SFTTrainer(model=_fp32_model(model_dir), args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[clock.callback])
    trainer.train()
    return clock.step_times()


def _token_rate(model_dir: Path, data: Path, args) -> tuple[int, float]:
    """(non-embedding parameters, mean tokens per example) — for the fraction of peak."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    # the LM head is a matmul too, but ours applies it only at labelled positions: count the blocks alone
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding.numel() - (
        0 if tied or output is None else output.weight.numel())
    _, examples = _tokenized(model_dir, data, args)
    return non_embedding, sum(len(e["input_ids"]) for e in examples) / len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-llama-20m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--shape", choices=["words", "mcq", "chat"], default="words",
                        help="words: --words / --reply-words random words; mcq: a question and a 2-word reply; "
                             "chat: the evidence's reasoning-gym families and KJV passages")
    parser.add_argument("--words", type=int, default=40, help="words per prompt")
    parser.add_argument("--reply-words", type=int, default=None, help="words per reply (default: --words)")
    parser.add_argument("--trl", action="store_true", help="also TRL's SFTTrainer (pip install -e .[bench])")
    parser.add_argument("--levers", action="store_true", help="also lmrefinery without / with each speed lever")
    parser.add_argument("--previous", action="store_true",
                        help="also lmrefinery with the kernels it used before 2026-12-05 (SDPA, foreach AdamW)")
    parser.add_argument("--anchor-attention", choices=["sdpa", "eager"], default="sdpa",
                        help="attention kernel of the HF Trainer and TRL models (default: transformers' own)")
    parser.add_argument("--packing", action="store_true",
                        help="also lmrefinery with train.packing (several examples to a row; docs/sft.md#packing)")
    parser.add_argument("--compile", action="store_true",
                        help="also lmrefinery with model.compile (each decoder block through torch.compile)")
    parser.add_argument("--no-anchors", action="store_true",
                        help="lmrefinery's variants only (e.g. --compile alternated with eager, more rounds)")
    parser.add_argument("--micro", type=int, default=None,
                        help="also lmrefinery with micro-batches of this size, grouped by length (the default "
                             "whenever a batch is split) and in the sampler's order, in the same run")
    args = parser.parse_args()
    global ANCHOR_ATTENTION
    ANCHOR_ATTENTION = args.anchor_attention
    if args.shape == "mcq":
        args.reply_words = 2
    import logging

    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_model_dir(root, args.model)
        data = make_data(root, args.batch * args.steps, args.words, args.reply_words or args.words,
                         "chat" if args.shape == "chat" else "words")
        variants = (["fp32/full-logits", "fp32/head-at-labels", "bf16/full-logits", "bf16/head-at-labels"]
                    if args.levers else [f"{args.precision}/head-at-labels"])
        variants += [f"{args.precision}/head-at-labels/packed"] if args.packing else []
        variants += [f"{args.precision}/head-at-labels/previous-kernels"] if args.previous else []
        variants += [f"{args.precision}/head-at-labels/compiled"] if args.compile else []
        variants += ([f"{args.precision}/head-at-labels/micro{args.micro}",
                      f"{args.precision}/head-at-labels/micro{args.micro}/ungrouped"] if args.micro else [])
        ours = {variant: [] for variant in variants}
        per_round = {variant: [] for variant in variants}
        theirs: dict[str, list[float]] = {} if args.no_anchors else {
            "hf_trainer": [], **({"trl_sft_trainer": []} if args.trl else {})}
        for round_index in range(args.rounds):
            if not args.no_anchors:
                theirs["hf_trainer"] += hf_trainer_step_times(model_dir, data, root, args, round_index)[args.warmup:]
            if args.trl and not args.no_anchors:
                theirs["trl_sft_trainer"] += trl_step_times(model_dir, data, root, args, round_index)[args.warmup:]
            for variant in variants:
                times = lmrefinery_step_times(model_dir, data, root, args, round_index, variant)[args.warmup:]
                ours[variant] += times
                per_round[variant].append(round(statistics.median(times), 3))
        peak = gemm_peak_flops(args.precision)
        non_embedding, mean_tokens = _token_rate(model_dir, data, args)
        shaped_peak = step_gemm_flops(model_dir, round(mean_tokens * args.batch), args.precision)

    step_flops = 6 * non_embedding * mean_tokens * args.batch  # forward + backward of the blocks' weights

    def figures(times: list[float]) -> dict:
        step = statistics.median(times)
        return {"step_s": round(step, 4), "per_example_s": round(step / args.batch, 4),
                "fraction_of_peak": round(step_flops / step / peak, 3),
                "fraction_of_step_gemm_rate": round(step_flops / step / shaped_peak, 3)}

    fastest_name = min(theirs, key=lambda name: statistics.median(theirs[name])) if theirs else None
    fastest = statistics.median(theirs[fastest_name]) if theirs else None
    print(json.dumps({
        "model": args.model, "non_embedding_parameters": non_embedding, "batch": args.batch,
        "max_length": args.max_length, "shape": args.shape, "mean_tokens_per_example": round(mean_tokens, 1),
        "precision": args.precision, "anchor_attention": args.anchor_attention,
        "gemm_peak_gflops": round(peak / 1e9, 1), "step_gemm_gflops": round(shaped_peak / 1e9, 1),
        "environment": describe(),
        "steps_measured_each": len(next(iter(ours.values()))),
        "anchors": {name: figures(times) for name, times in theirs.items()}, "fastest_anchor": fastest_name,
        "lmrefinery": {variant: {**figures(times), "ratio_over_fastest_anchor":
                                 round(statistics.median(times) / fastest, 3) if fastest else None,
                                 "step_s_per_round": per_round[variant],
                                 "first_step_s_per_round": FIRST_STEP_S.get(variant)}
                       for variant, times in ours.items()},
        "targets": {"ratio_over_fastest_anchor": "<= 0.5", "fraction_of_peak": ">= 0.5"}}, indent=2))


if __name__ == "__main__":
    main()
