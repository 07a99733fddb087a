"""RHO-style data selection scores (a baseline of ScaleBiO).

Excess loss: score = loss of the model being trained − loss of a reference model trained on the validation set,
each an example's token-mean loss over its response tokens. High excess loss marks examples that are learnable (the
reference fits them) but not yet learnt.
"""

from __future__ import annotations

import torch
from torch import nn

from lmrefinery.data.collate import collate
from lmrefinery.data.sources import SourcePool
from lmrefinery.train.losses import example_loss_sums


@torch.no_grad()
def example_losses(model: nn.Module, pool: SourcePool, batch_size: int, precision: str, pad_id: int,
                   progress=None) -> torch.Tensor:
    """Each example's token-mean loss over its response tokens, in pool order (float64)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses = torch.empty(len(pool.examples), dtype=torch.float64)
    for start in range(0, len(pool.examples), batch_size):
        batch = collate(pool.examples[start: start + batch_size], pad_id).to(device)
        sums, tokens = example_loss_sums(model, batch, precision)
        losses[start: start + len(sums)] = (sums.double() / tokens.clamp(min=1).double()).cpu()
        if progress is not None:
            progress.update(1)
    model.train(was_training)
    return losses


def excess_loss(current_losses: torch.Tensor, reference_losses: torch.Tensor) -> torch.Tensor:
    """RHO's score: how much the reference model beats the model being trained on each example."""
    return current_losses - reference_losses
