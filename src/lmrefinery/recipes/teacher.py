"""`lmrefinery teacher`: the teacher's top-k cache over the training data (docs/methods/first.md §3).

Batched teacher forward passes through `distill.topk.teacher_topk` (response positions only, fp32 log-softmax).
Shards of `shard_size` examples are written atomically; a rerun with --resume keeps finished shards and redoes the
rest. Under torchrun each process computes its own shards (a full teacher replica each); rank 0 writes the manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lmrefinery.config import TeacherConfig
from lmrefinery.data.collate import collate
from lmrefinery.distill.cache import (MANIFEST, ConcentrationStats, completed_shards, id_dtype_for, shard_provenance,
                                      write_manifest, write_shard)
from lmrefinery.distill.topk import teacher_topk
from lmrefinery.errors import UserError
from lmrefinery.fileio import output_directory, remove_temporaries
from lmrefinery.models import load_model
from lmrefinery.recipes.common import load_data
from lmrefinery.train.rng import seed_everything
from lmrefinery.train.distributed import barrier, progress_bar, setup_distributed
from lmrefinery.train.packing_check import check_packing_exact
from lmrefinery.train.run_dir import lock_run_dir

log = logging.getLogger(__name__)


def _check_cache_dir(output_dir: Path, resume: bool | str) -> None:
    if resume == "auto":  # finish what is there, or start: either way only what is missing is computed
        return
    has_cache = (output_dir / MANIFEST).exists() or any(output_dir.glob("shard-*"))
    if has_cache and not resume:
        raise UserError(f"{output_dir}: already holds a teacher cache; pass --resume to finish it or choose "
                        f"another output_dir")
    if resume and not has_cache:
        raise UserError(f"{output_dir}: --resume, but there is no teacher cache here to finish; run without --resume "
                        f"to start it")


def run(config: TeacherConfig, resume: bool | str = False) -> Path:
    resume = resume or config.resume  # the --resume flag, else the config's `resume`
    env = setup_distributed()
    output_dir = output_directory(config.output_dir)
    _check_cache_dir(output_dir, resume)
    seed_everything(config.seed, env.rank)
    tokenizer, pool, _ = load_data(config.model, config.data)
    model = load_model(config.model, env.device, training=False)
    model.eval()
    input_device = model.device if config.model.device_map else env.device  # the first GPU under device_map
    vocab_size = model.get_output_embeddings().weight.shape[0]
    id_dtype = id_dtype_for(vocab_size)
    logprob_dtype = getattr(torch, config.logprob_dtype)

    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock_run_dir(output_dir)
        remove_temporaries(output_dir)
    barrier(env)
    total = len(pool.examples)
    shard_count = -(-total // config.shard_size)
    provenance = shard_provenance(config.model.name_or_path, config.k, config.shard_size, config.logprob_dtype,
                                  pool.examples)
    done = completed_shards(output_dir, provenance) if resume else {}
    mine = [i for i in range(shard_count) if i % env.world_size == env.rank and i not in done]
    if done:
        log.info("resuming: %d of %d shards already complete", len(done), shard_count)
    progress = progress_bar(env, sum(min(config.shard_size, total - i * config.shard_size) for i in mine), "teacher")
    for index in mine:
        first = index * config.shard_size
        members = list(range(first, min(first + config.shard_size, total)))
        stats = ConcentrationStats()
        ids, logprobs, tails, counts = [], [], [], [0]
        for start in range(0, len(members), config.batch_size):
            chunk = members[start: start + config.batch_size]
            batch = collate([pool.examples[i] for i in chunk], tokenizer.pad_token_id,
                            pack_rows=config.packing).to(input_device)
            check_packing_exact(model, batch)
            for example_ids, example_logprobs, example_tail in zip(*teacher_topk(model, batch, config.k,
                                                                                 config.model.precision, stats)):
                ids.append(example_ids.to(id_dtype).cpu())
                logprobs.append(example_logprobs.to(logprob_dtype).cpu())
                tails.append(example_tail.to(logprob_dtype).cpu())
                counts.append(counts[-1] + example_ids.shape[0])
            progress.update(len(chunk))
        write_shard(output_dir, index, torch.cat(ids), torch.cat(logprobs), torch.cat(tails),
                    torch.tensor(counts, dtype=torch.int64), first, stats, provenance)
    progress.close()
    barrier(env)
    if env.is_main:
        manifest = write_manifest(output_dir, teacher=config.model.name_or_path, tokenizer=tokenizer,
                                  vocab_size=vocab_size, k=config.k, logprob_dtype=config.logprob_dtype, pool=pool,
                                  data=config.data.model_dump(mode="json"), model=config.model.model_dump(mode="json"),
                                  provenance=provenance)
        lines = [f"  top-{k}: mean {v['mean']:.3f}, median {v['median']:.3f}, 5th percentile {v['p5']:.3f}"
                 for k, v in manifest["concentrated_knowledge"].items()]
        log.info("cumulative teacher probability in the top-k tokens (response positions):\n%s", "\n".join(lines))
        log.info("cache in %s (%d examples, %d positions)", output_dir, manifest["examples"], manifest["positions"])
    barrier(env)
    return output_dir
