"""The teacher pass (docs/methods/first.md §3): at response positions, the teacher's top-k token ids and
log-probabilities from an fp32 log-softmax over the full vocabulary, plus the log of the mass outside them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmrefinery.data.collate import Batch
from lmrefinery.data.tokenize import IGNORE_INDEX
from lmrefinery.distill.cache import STAT_KS, ConcentrationStats
from lmrefinery.distill.losses import log1mexp
from lmrefinery.models.head import logits_at
from lmrefinery.train.precision import autocast

POSITION_CHUNK = 512  # positions per fp32 log-softmax: bounds the fp32 copy to 512 × vocabulary


@torch.no_grad()
def teacher_topk(model, batch: Batch, k: int, precision: str, stats: ConcentrationStats | None = None):
    """Per example of the batch: (ids [P, k], logprobs [P, k], tail [P]) at its response positions (those whose next
    token is supervised). `stats` collects the cumulative top-1..10 mass of every position."""
    response = batch.labels[:, 1:] != IGNORE_INDEX
    with autocast(precision, batch.input_ids.device):
        selected = logits_at(model, batch.hidden_positions(F.pad(response, (0, 1), value=False)),
                             **batch.model_inputs())
    keep = max(k, len(STAT_KS))
    ids, logprobs, tails = [], [], []
    for start in range(0, selected.shape[0], POSITION_CHUNK):
        log_probs = torch.log_softmax(selected[start: start + POSITION_CHUNK].float(), dim=-1)
        top = log_probs.topk(min(keep, log_probs.shape[-1]), dim=-1)
        if stats is not None:
            stats.add(top.values.exp())
        ids.append(top.indices[:, :k])
        logprobs.append(top.values[:, :k])
        tails.append(log1mexp(torch.logsumexp(top.values[:, :k], dim=-1)))
    counts = response.sum(dim=1).tolist()
    return torch.cat(ids).split(counts), torch.cat(logprobs).split(counts), torch.cat(tails).split(counts)
