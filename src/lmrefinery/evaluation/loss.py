"""Token-mean loss and perplexity on a pool of examples, overall and per source; data parallel under torchrun.

Overall it also reports how well calibrated the next-token predictions on the supervised (response) tokens are:
top-1 accuracy, ECE of the top-1 confidence (equal-width bins, the convention of evaluation/calibration.py) and the
full-vocabulary Brier score. Each is accumulated as per-bin sums, so the all-reduce stays exact under torchrun.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lmrefinery.data.collate import collate
from lmrefinery.data.sources import SourcePool
from lmrefinery.evaluation.calibration import bin_indices
from lmrefinery.train.distributed import DistEnv, all_reduce_sum
from lmrefinery.train.losses import ResponseLogits, cross_entropy_sums, response_logits
from lmrefinery.train.packing_check import check_packing_exact


def _summary(loss_sum: float, tokens: int, examples: int) -> dict:
    loss = loss_sum / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens and loss < 700 else float("inf"),
            "tokens": tokens, "examples": examples}


@torch.no_grad()
def evaluate_loss(model: nn.Module, pool: SourcePool, env: DistEnv, batch_size: int, precision: str,
                  pad_id: int, progress=None, n_bins: int = 10, pack_rows: bool = False) -> dict:
    """Each rank scores a strided slice of the length-sorted pool; sums are all-reduced, so results do not depend
    on the number of processes (up to float summation order). `per_example` lists, in pool order, each example's
    token-loss sum and supervised token count (its own token-mean loss is their ratio)."""
    was_training = model.training
    model.eval()
    order = np.argsort(pool.lengths(), kind="stable").tolist()  # stable: ties keep pool order, as sorted()
    mine = order[env.rank::env.world_size]
    batches = [mine[i: i + batch_size] for i in range(0, len(mine), batch_size)]
    count = torch.tensor([len(batches)], device=env.device)
    if env.distributed:  # every rank must run the same number of forwards: FSDP gathers parameters collectively
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    num_sources = len(pool.names)
    loss_sums = torch.zeros(num_sources, dtype=torch.float64, device=env.device)
    token_counts = torch.zeros(num_sources, dtype=torch.float64, device=env.device)
    example_counts = torch.zeros(num_sources, dtype=torch.float64, device=env.device)
    example_sums = torch.zeros(len(pool.examples), 2, dtype=torch.float64, device=env.device)  # loss sum, tokens
    token_calibration = TokenCalibration(n_bins, env.device)
    for index in range(int(count.item())):
        real = index < len(batches)
        batch = collate([pool.examples[i] for i in (batches[index] if real else order[:1])], pad_id,
                        pack_rows=pack_rows).to(env.device)
        check_packing_exact(model, batch)
        response = response_logits(model, batch, precision)
        sums, tokens = cross_entropy_sums(response)
        if real:
            token_calibration.add(response)
            loss_sums.index_add_(0, batch.source_ids, sums.double())
            token_counts.index_add_(0, batch.source_ids, tokens.double())
            example_counts.index_add_(0, batch.source_ids, torch.ones_like(sums, dtype=torch.float64))
            rows = torch.tensor(batches[index], device=env.device)
            example_sums[rows] = torch.stack([sums.double(), tokens.double()], dim=1).to(env.device)
        if progress is not None:
            progress.update(1)
    for tensor in (loss_sums, token_counts, example_counts, example_sums, *token_calibration.tensors()):
        all_reduce_sum(tensor, env)
    model.train(was_training)
    per_source = {name: _summary(float(loss_sums[i]), int(token_counts[i]), int(example_counts[i]))
                  for i, name in enumerate(pool.names)}
    overall = _summary(float(loss_sums.sum()), int(token_counts.sum()), int(example_counts.sum()))
    overall.update(token_calibration.summary())
    per_example = [{"source": pool.names[example.source_id], "record": example.record, "loss_sum": float(total),
                    "tokens": int(tokens)} for example, (total, tokens) in zip(pool.examples, example_sums.tolist())]
    return {"overall": overall, "per_source": per_source, "per_example": per_example}


class TokenCalibration:
    """Per-bin sums of top-1 confidence and correctness, and the Brier sum, over supervised next-token predictions."""

    def __init__(self, n_bins: int, device: torch.device):
        self.n_bins = n_bins
        self.counts = torch.zeros(n_bins, dtype=torch.float64, device=device)
        self.confidence_sums = torch.zeros_like(self.counts)
        self.correct_sums = torch.zeros_like(self.counts)
        self.brier_sum = torch.zeros(1, dtype=torch.float64, device=device)

    def add(self, response: ResponseLogits, chunk: int = 1024) -> None:
        positions, gold_ids = response.logits, response.targets
        # Positions in chunks: a full-vocabulary fp32 softmax of a whole batch would dwarf the model's own memory.
        for start in range(0, len(gold_ids), chunk):
            probabilities = torch.softmax(positions[start: start + chunk].float(), dim=-1)
            gold = gold_ids[start: start + chunk]
            confidence, predicted = probabilities.max(dim=-1)
            gold_probability = probabilities.gather(1, gold[:, None]).squeeze(1)
            # Σ_v (p_v − 1[v = gold])² = Σ_v p_v² − 2·p_gold + 1
            self.brier_sum += (probabilities.square().sum(dim=-1) - 2 * gold_probability + 1).double().sum()
            bins = torch.as_tensor(bin_indices(confidence, self.n_bins), device=self.counts.device)
            self.counts.index_add_(0, bins, torch.ones_like(confidence, dtype=torch.float64))
            self.confidence_sums.index_add_(0, bins, confidence.double())
            self.correct_sums.index_add_(0, bins, (predicted == gold).double())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.counts, self.confidence_sums, self.correct_sums, self.brier_sum

    def summary(self) -> dict:
        total = float(self.counts.sum())
        if not total:
            return {"token_accuracy": float("nan"), "token_ece": float("nan"), "token_brier": float("nan")}
        ece = float((self.confidence_sums - self.correct_sums).abs().sum()) / total
        return {"token_accuracy": float(self.correct_sums.sum()) / total, "token_ece": ece,
                "token_brier": float(self.brier_sum) / total}
