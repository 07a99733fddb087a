"""Token-mean loss and perplexity on a pool of examples, overall and per source; data parallel under torchrun."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from lmrefinery.data.collate import collate
from lmrefinery.data.sources import SourcePool
from lmrefinery.train.distributed import DistEnv, all_reduce_sum
from lmrefinery.train.losses import example_loss_sums


def _summary(loss_sum: float, tokens: int, examples: int) -> dict:
    loss = loss_sum / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens and loss < 700 else float("inf"),
            "tokens": tokens, "examples": examples}


@torch.no_grad()
def evaluate_loss(model: nn.Module, pool: SourcePool, env: DistEnv, batch_size: int, precision: str,
                  pad_id: int, progress=None) -> dict:
    """Each rank scores a strided slice of the length-sorted pool; sums are all-reduced, so results do not depend
    on the number of processes (up to float summation order)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(pool.examples)), key=lambda i: len(pool.examples[i].input_ids))
    mine = order[env.rank::env.world_size]
    batches = [mine[i: i + batch_size] for i in range(0, len(mine), batch_size)]
    count = torch.tensor([len(batches)], device=env.device)
    if env.distributed:  # every rank must run the same number of forwards: FSDP gathers parameters collectively
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    num_sources = len(pool.names)
    loss_sums = torch.zeros(num_sources, dtype=torch.float64, device=env.device)
    token_counts = torch.zeros(num_sources, dtype=torch.float64, device=env.device)
    example_counts = torch.zeros(num_sources, dtype=torch.float64, device=env.device)
    for index in range(int(count.item())):
        real = index < len(batches)
        batch = collate([pool.examples[i] for i in (batches[index] if real else order[:1])], pad_id).to(env.device)
        sums, tokens = example_loss_sums(model, batch, precision)
        if real:
            loss_sums.index_add_(0, batch.source_ids, sums.double())
            token_counts.index_add_(0, batch.source_ids, tokens.double())
            example_counts.index_add_(0, batch.source_ids, torch.ones_like(sums, dtype=torch.float64))
        if progress is not None:
            progress.update(1)
    for tensor in (loss_sums, token_counts, example_counts):
        all_reduce_sum(tensor, env)
    model.train(was_training)
    per_source = {name: _summary(float(loss_sums[i]), int(token_counts[i]), int(example_counts[i]))
                  for i, name in enumerate(pool.names)}
    overall = _summary(float(loss_sums.sum()), int(token_counts.sum()), int(example_counts.sum()))
    return {"overall": overall, "per_source": per_source}
