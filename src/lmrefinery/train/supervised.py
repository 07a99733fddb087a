"""One supervised optimizer step over a sampled global batch: the `step_fn` that sft and distill give the loop."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lmrefinery.data.collate import collate, rank_micro_batches
from lmrefinery.data.sampling import MixtureSampler
from lmrefinery.data.sources import SourcePool
from lmrefinery.train.distributed import DistEnv
from lmrefinery.train.losses import LossSumsFn, example_loss_sums, optimizer_step
from lmrefinery.train.packing_check import check_packing_exact


def supervised_step_fn(model: nn.Module, optimizer, scheduler, sampler: MixtureSampler, pool: SourcePool,
                       env: DistEnv, *, micro_batch_size: int, precision: str, max_grad_norm: float | None,
                       pad_id: int, loss_sums_fn: LossSumsFn = example_loss_sums,
                       normalize_by: str = "tokens", pack_rows: bool = False) -> Callable[[int], dict]:
    lengths = pool.lengths()  # micro-batches group examples of similar length (exact: see rank_micro_batches)

    def step(index: int) -> dict:
        global_batch = sampler.next_batch()
        micro_batches = [collate([pool.examples[i] for i in indices], pad_id, indices, pack_rows).to(env.device)
                         for indices in rank_micro_batches(global_batch, env.rank, env.world_size, micro_batch_size,
                                                           lengths)]
        if micro_batches:
            check_packing_exact(model, micro_batches[0])
        lr = scheduler.get_last_lr()[0]
        result = optimizer_step(model, optimizer, scheduler, micro_batches, env, precision, max_grad_norm, index + 1,
                                loss_sums_fn, normalize_by)
        return {"loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                "supervised_tokens": result.supervised_tokens, "input_tokens": result.input_tokens,
                "padded_tokens": result.padded_tokens,
                **result.stats, "source_counts": pool.counts(global_batch)}
    return step
