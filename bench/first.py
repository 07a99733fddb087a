"""FIRST, side by side in one run: cache size, teacher-pass throughput, distill vs sft vs online-KD step time, and
the peak memory of the top-k loss vs a full-vocabulary implementation.

Teacher: smollm2-135m-instruct (30 blocks), or `--model random-wide` (a random Llama, hidden 1024, 16 blocks, the
test suite's small vocabulary — so that the blocks, not the embedding, carry the compute); student: the teacher's
blocks 0, N, 2N, … (`keep-layers`, every `--student-every` = 2nd: half the blocks, as the evidence's students).

1. bytes per response position of the cache (k = 5: uint16/int32 ids, fp16 log-probs, fp16 tail; files included),
   and of the same data in the authors' JSON-per-token format ({position: {token_id: prob}} per example, response
   positions only — a lower bound for their format, which also stores padding positions);
2. throughput of the teacher pass (forward + fp32 log-softmax + top-k) / a bare teacher forward, same batches;
   and the teacher pass with bf16-loaded weights (`model.load_dtype: bfloat16`) vs fp32: the throughput ratio, the
   share of positions whose top-k ids agree, and the largest difference of their cached log-probs (report only);
3. distill step / sft step on the same student and batches;
4. distill step / online full-vocabulary KD step (the live teacher's forward included), with the teacher's weights
   in fp32 and loaded in bf16 (`model.load_dtype: bfloat16`, its forward under bf16 autocast), and the teacher's
   compute per token over the student's (2 × parameters outside the embedding, each);
5. peak memory of the loss's forward+backward from the same bf16 logits: top-k KL (other bucket on, chunked) vs
   the full-vocabulary log-softmax implementation — each in a child process: growth of the peak resident set
   (VmHWM, reset just before the loss) over the resident set with the inputs in place.

    python bench/first.py [--examples 16 --batch 4]
    python bench/first.py --model random-wide
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.process_memory import rss_bytes  # noqa: E402
from bench.reweight_step import write_data  # noqa: E402


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def memory_child(kind: str, args) -> dict:
    import torch

    from lmrefinery.distill.losses import topk_kl_loss

    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.memory_tokens, args.memory_vocab)
    logits = torch.randn(shape, generator=generator).to(torch.bfloat16).requires_grad_(True)
    ids = torch.randint(0, args.memory_vocab, (*shape[:2], 5), generator=generator)
    logprobs = torch.log_softmax(torch.randn(*shape[:2], 5, generator=generator), -1) - 0.05
    mask = torch.ones(shape[:2], dtype=torch.bool)
    baseline = rss_bytes()
    with open("/proc/self/clear_refs", "w") as handle:  # reset the kernel's peak-RSS mark (VmHWM) to "now"
        handle.write("5")
    if kind == "topk":
        loss = topk_kl_loss(logits, ids, logprobs, mask, other_bucket=True)
    else:  # the straightforward implementation: fp32 log-softmax over the whole vocabulary, then gather
        full = torch.log_softmax(logits.float(), dim=-1)
        inside = full.gather(-1, ids)
        other = torch.log1p(-inside.exp().sum(-1).clamp(max=1 - 1e-6))
        log_q = torch.cat([inside, other.unsqueeze(-1)], -1)
        target = torch.softmax(torch.cat([logprobs, torch.log1p(-logprobs.exp().sum(-1)).unsqueeze(-1)], -1), -1)
        loss = (target * (target.log() - log_q)).sum(-1).mean()
    loss.backward()
    with open("/proc/self/status") as handle:
        peak = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))
    return {"kind": kind, "peak_growth_bytes": peak - baseline}


def make_wide_model(root: Path) -> str:
    """A random Llama whose blocks dominate its compute (hidden 1024, 16 blocks, a vocabulary of a few thousand)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    directory = root / "random-wide"
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def block_parameters(model) -> int:
    """Parameters outside the embedding and the LM head: what a token's forward multiplies by (× 2 FLOPs)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    untied_head = head is not None and head.weight is not embedding
    return sum(p.numel() for p in model.parameters()) - embedding.numel() - (head.weight.numel() if untied_head else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--words", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--student-every", type=int, default=2, help="the student keeps every N-th teacher block")
    parser.add_argument("--memory-tokens", type=int, default=256)
    parser.add_argument("--memory-vocab", type=int, default=49152)
    parser.add_argument("--memory", choices=["topk", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        print("RESULT " + json.dumps(memory_child(args.memory, args)))
        return
    import logging

    logging.disable(logging.INFO)
    import torch

    from lmrefinery.config import DistillLossConfig, ModelConfig, TeacherConfig, TrainConfig, validate_config
    from lmrefinery.data.collate import collate
    from lmrefinery.distill.cache import ConcentrationStats
    from lmrefinery.distill.student import every_nth, keep_layers
    from lmrefinery.distill.topk import teacher_topk
    from lmrefinery.models import find_decoder_layers, load_model
    from lmrefinery.recipes import teacher as teacher_recipe
    from lmrefinery.recipes.common import load_cache_with_data
    from lmrefinery.recipes.distill import cached_loss_fn, online_loss_fn
    from lmrefinery.train.distributed import DistEnv
    from lmrefinery.train.losses import example_loss_sums, optimizer_step
    from lmrefinery.train.optim import build_adamw

    report = {"model": args.model}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.model == "random-wide":
            args.model = make_wide_model(root)
        data = write_data(root, args.examples, args.words, 0)
        cache_dir = root / "cache"
        teacher_recipe.run(validate_config(TeacherConfig, {
            "output_dir": str(cache_dir), "model": {"name_or_path": args.model}, "k": 5, "batch_size": args.batch,
            "data": {"sources": [{"name": "data", "path": str(data)}], "max_length": 256}}))
        cache, tokenizer, pool, _ = load_cache_with_data(str(cache_dir))
        positions = cache.manifest["positions"]
        cache_bytes = sum(p.stat().st_size for p in cache_dir.glob("shard-*.safetensors"))
        authors = []
        for index in range(len(pool.examples)):
            ids, logprobs, _ = cache.rows(index)
            authors.append(json.dumps({str(t): {str(int(i)): float(p) for i, p in zip(row_ids, row.exp())}
                                       for t, (row_ids, row) in enumerate(zip(ids, logprobs))}))
        json_bytes = sum(len(line) + 1 for line in authors)
        report["cache"] = {"positions": positions, "bytes_per_position": round(cache_bytes / positions, 2),
                           "payload_bytes_per_position": round(
                               (5 * (2 if cache.manifest["id_dtype"] == "uint16" else 4) + 5 * 2 + 2), 2),
                           "authors_json_bytes_per_position": round(json_bytes / positions, 2), "target": "<= 30"}

        env = DistEnv()
        teacher = load_model(ModelConfig(name_or_path=args.model)).eval()
        batches = [collate(pool.examples[i: i + args.batch], tokenizer.pad_token_id, list(range(i, i + args.batch)))
                   for i in range(0, len(pool.examples) - args.batch + 1, args.batch)]
        def bare():
            with torch.no_grad():
                for batch in batches:
                    teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

        def teacher_pass():
            for batch in batches:
                teacher_topk(teacher, batch, 5, "fp32", ConcentrationStats())

        bare_s, pass_s = timed(bare, args.repeats), timed(teacher_pass, args.repeats)
        report["teacher_pass"] = {"bare_forward_s": round(bare_s, 3), "teacher_pass_s": round(pass_s, 3),
                                  "throughput_ratio": round(bare_s / pass_s, 3), "target": ">= 0.9"}

        # the teacher pass with the weights loaded in bfloat16 (model.load_dtype) against fp32: speed and how far the
        # cached log-probabilities move (compared where both passes chose the same top-k ids, in the same order)
        teacher_bf16 = load_model(ModelConfig(name_or_path=args.model, load_dtype="bfloat16"), training=False).eval()

        def teacher_pass_bf16():
            for batch in batches:
                teacher_topk(teacher_bf16, batch, 5, "bf16", ConcentrationStats())

        bf16_s = timed(teacher_pass_bf16, args.repeats)
        same, positions_seen, max_difference = 0, 0, 0.0
        with torch.no_grad():
            for batch in batches:
                exact = teacher_topk(teacher, batch, 5, "fp32")
                low = teacher_topk(teacher_bf16, batch, 5, "bf16")
                for ids32, lp32, ids16, lp16 in zip(exact[0], exact[1], low[0], low[1]):
                    agree = (ids32 == ids16).all(dim=-1)
                    positions_seen += len(agree)
                    same += int(agree.sum())
                    if agree.any():
                        max_difference = max(max_difference, float((lp32[agree] - lp16[agree]).abs().max()))
        report["teacher_pass_bf16"] = {"fp32_s": round(pass_s, 3), "bf16_s": round(bf16_s, 3),
                                       "throughput_bf16_over_fp32": round(pass_s / bf16_s, 3),
                                       "positions_with_same_topk_ids": round(same / positions_seen, 4),
                                       "max_abs_logprob_difference": round(max_difference, 4)}

        keep = every_nth(len(find_decoder_layers(teacher)), args.student_every)
        student = keep_layers(teacher, keep).train()
        optimizer = build_adamw(student, TrainConfig(lr=1e-6))
        loss_config = validate_config(DistillLossConfig, {"teacher_transform": "prob_temperature", "temperature": 0.3})
        distill_fn = cached_loss_fn(cache, loss_config, "prob_temperature", 0.3)
        online_fn = online_loss_fn(teacher, 1.0)
        online_bf16_fn = online_loss_fn(teacher_bf16, 1.0)

        def steps(fn):
            def run_all():
                for batch in batches:
                    optimizer_step(student, optimizer, None, [batch], env, "fp32", 1.0, 0, fn)
            return run_all

        sft_s = timed(steps(example_loss_sums), args.repeats)
        distill_s = timed(steps(distill_fn), args.repeats)
        online_s = timed(steps(online_fn), args.repeats)
        online_bf16_s = timed(steps(online_bf16_fn), args.repeats)
        teacher_params = sum(p.numel() for p in teacher.parameters())
        student_params = sum(p.numel() for p in student.parameters())
        report["steps"] = {
            "student_blocks": keep, "teacher_over_student_parameters": round(teacher_params / student_params, 2),
            "teacher_over_student_blocks": round(len(find_decoder_layers(teacher)) / len(keep), 2),
            "teacher_over_student_block_compute": round(block_parameters(teacher) / block_parameters(student), 2),
            "sft_s": round(sft_s / len(batches), 3), "distill_s": round(distill_s / len(batches), 3),
            "online_kd_s": round(online_s / len(batches), 3),
            "online_kd_bf16_teacher_s": round(online_bf16_s / len(batches), 3),
            "distill_over_sft": round(distill_s / sft_s, 3), "target_distill_over_sft": "<= 1.1",
            "distill_over_online_kd": round(distill_s / online_s, 3),
            "distill_over_online_kd_bf16_teacher": round(distill_s / online_bf16_s, 3),
            "target_distill_over_online": "<= 0.5"}

    env_vars = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    memory = {}
    for kind in ("topk", "full"):
        command = [sys.executable, __file__, "--memory", kind, "--batch", str(args.batch),
                   "--memory-tokens", str(args.memory_tokens), "--memory-vocab", str(args.memory_vocab)]
        output = subprocess.run(command, env=env_vars, capture_output=True, text=True, check=True).stdout
        memory[kind] = json.loads(next(l for l in output.splitlines() if l.startswith("RESULT "))[7:])
    report["loss_memory"] = {"shape": [args.batch, args.memory_tokens, args.memory_vocab],
                             "topk_peak_growth_mb": round(memory["topk"]["peak_growth_bytes"] / 2**20, 1),
                             "full_vocab_peak_growth_mb": round(memory["full"]["peak_growth_bytes"] / 2**20, 1),
                             "ratio": round(memory["topk"]["peak_growth_bytes"]
                                            / max(memory["full"]["peak_growth_bytes"], 1), 3)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
