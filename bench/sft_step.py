"""Step time of `lmrefinery sft` vs a plain Hugging Face Trainer loop, same model, data and batch, side by side.

Both runs go through their whole training loop (data, forward, backward, clipping, AdamW, schedule, logging); the
per-step wall time is taken between consecutive step ends, the first `--warmup` steps dropped, and the median
compared. The runs alternate for `--rounds` rounds in one process so that machine noise hits all alike.

`--levers` also measures lmrefinery with its speed levers switched off and on one at a time: the LM head applied at
every position (`full-logits`, how it was before) vs only where a label exists (`head-at-labels`), and fp32 vs bf16
autocast (`--reply-words 2` makes multiple-choice-like data, where almost every position is prompt).

    python bench/sft_step.py                                  # a random 6-layer Llama of ≈ 20M parameters
    python bench/sft_step.py --model smollm2-135m-instruct --levers --reply-words 2
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


def make_data(root: Path, examples: int, length_words: int, reply_words: int) -> Path:
    import random

    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog two plus three is five capital of France Paris".split()
    path = root / "data.jsonl"
    with path.open("w") as handle:
        for _ in range(examples):
            question = " ".join(rng.choice(words) for _ in range(length_words))
            answer = " ".join(rng.choice(words) for _ in range(reply_words))
            handle.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    return path


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

    precision, head = variant.split("/")
    original = losses.response_logits
    if head == "full-logits":
        losses.response_logits = _full_logits
    out = root / f"lmrefinery-{round_index}-{variant.replace('/', '-')}"
    config = validate_config(SFTConfig, {
        "output_dir": str(out), "model": {"name_or_path": str(model_dir), "precision": precision},
        "data": {"sources": [{"name": "data", "path": str(data)}], "max_length": args.max_length},
        "sampling": {"strategy": "proportional"}, "save_model": False,
        "train": {"steps": args.steps, "batch_size": args.batch, "micro_batch_size": args.batch, "lr": 1e-5,
                  "warmup_steps": 0, "checkpoint_every": 10 ** 6, "keep_last": 1}})
    try:
        sft.run(config)
    finally:
        losses.response_logits = original
    times = [m["time"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    return [b - a for a, b in zip(times, times[1:])]


def hf_trainer_step_times(model_dir: Path, data: Path, root: Path, args, round_index: int) -> list[float]:
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from lmrefinery.config import DataConfig, SourceConfig
    from lmrefinery.data.sources import load_pool
    from lmrefinery.data.tokenize import ChatEncoder

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    data_config = DataConfig(sources=[SourceConfig(name="data", path=str(data))], max_length=args.max_length)
    pool = load_pool(data_config.sources, ChatEncoder(tokenizer), data_config)
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in pool.examples]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.time())

    training_args = TrainingArguments(
        output_dir=str(root / f"hf-{round_index}"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=1e-5, lr_scheduler_type="cosine", max_grad_norm=1.0, optim="adamw_torch", logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), callbacks=[StepClock()])
    trainer.train()
    return [b - a for a, b in zip(ends, ends[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-llama-20m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--words", type=int, default=40, help="words per prompt")
    parser.add_argument("--reply-words", type=int, default=None, help="words per reply (default: --words)")
    parser.add_argument("--levers", action="store_true", help="also lmrefinery without / with each speed lever")
    args = parser.parse_args()
    import logging

    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_model_dir(root, args.model)
        data = make_data(root, args.batch * args.steps, args.words, args.reply_words or args.words)
        from transformers import AutoConfig, AutoModelForCausalLM

        variants = (["fp32/full-logits", "fp32/head-at-labels", "bf16/full-logits", "bf16/head-at-labels"]
                    if args.levers else ["fp32/head-at-labels"])
        ours = {variant: [] for variant in variants}
        theirs = []
        for round_index in range(args.rounds):
            theirs += hf_trainer_step_times(model_dir, data, root, args, round_index)[args.warmup:]
            for variant in variants:
                ours[variant] += lmrefinery_step_times(model_dir, data, root, args, round_index,
                                                       variant)[args.warmup:]
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(model_dir)).parameters())
    theirs_median = statistics.median(theirs)
    print(json.dumps({
        "model": args.model, "parameters": parameters, "batch": args.batch, "max_length": args.max_length,
        "prompt_words": args.words, "reply_words": args.reply_words or args.words,
        "steps_measured_each": len(theirs), "hf_trainer_fp32_step_s": round(theirs_median, 4),
        "lmrefinery": {variant: {"step_s": round(statistics.median(times), 4),
                                 "ratio_over_hf_fp32": round(statistics.median(times) / theirs_median, 3)}
                       for variant, times in ours.items()},
        "target": "fp32/head-at-labels ratio <= 1.05"}, indent=2))


if __name__ == "__main__":
    main()
