"""LESS-style data selection scores (a baseline of ScaleBiO).

LESS-style influence: each example's gradient of its token-mean loss with respect to the last `layers` decoder blocks,
projected to `dim` numbers by a CountSketch (below); the score is the cosine similarity between an example's
projected gradient and the mean projected gradient of the validation examples. Because the projection is linear, the
mean of projections is the projection of the mean validation gradient, and inner products are preserved in
expectation, so the scores rank examples as the exact gradient cosines do (tested against them).
"""

from __future__ import annotations

import torch
from torch import nn

from lmrefinery.data.collate import collate
from lmrefinery.data.sources import SourcePool
from lmrefinery.models.layers import find_decoder_layers
from lmrefinery.train.losses import example_loss_sums


class CountSketch:
    """A seeded random projection R^P → R^dim: coordinate i is added, with sign s(i) ∈ {−1, +1}, to bucket h(i).

    E⟨Sx, Sy⟩ = ⟨x, y⟩ and the error shrinks as 1/√dim (a sparse Johnson–Lindenstrauss transform). It costs O(P) per
    vector and P indices of memory, where a dense Gaussian projection of a few million gradient coordinates to
    thousands of dimensions would not fit in memory.
    """

    def __init__(self, sizes: list[int], dim: int, seed: int, device: torch.device | str = "cpu"):
        generator = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.buckets = [torch.randint(0, dim, (n,), generator=generator).to(device) for n in sizes]
        self.signs = [(torch.randint(0, 2, (n,), generator=generator) * 2 - 1).float().to(device) for n in sizes]

    def project(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(self.dim, dtype=torch.float32, device=self.buckets[0].device)
        for tensor, buckets, signs in zip(tensors, self.buckets, self.signs):
            out.index_add_(0, buckets, tensor.detach().reshape(-1).float() * signs)
        return out


def last_block_parameters(model: nn.Module, layers: int) -> list[nn.Parameter]:
    blocks = find_decoder_layers(model)
    if not 1 <= layers <= len(blocks):
        raise ValueError(f"layers must be between 1 and {len(blocks)} (the model's decoder blocks), got {layers}")
    return [p for block in list(blocks)[-layers:] for p in block.parameters()]


def example_gradients(model: nn.Module, pool: SourcePool, parameters: list[nn.Parameter], precision: str,
                      pad_id: int, progress=None):
    """Yield, per example in pool order, the gradient of its token-mean loss with respect to `parameters`.

    Only `parameters` require grad meanwhile, so the backward pass stops at the first of them.
    """
    was_training = model.training
    model.eval()  # no dropout: a score must not depend on a random mask
    previous = {p: p.requires_grad for p in model.parameters()}
    chosen = {id(p) for p in parameters}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    device = parameters[0].device
    try:
        for example in pool.examples:
            batch = collate([example], pad_id).to(device)
            sums, tokens = example_loss_sums(model, batch, precision)
            yield torch.autograd.grad(sums.sum() / tokens.sum().clamp(min=1), parameters)
            if progress is not None:
                progress.update(1)
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)
        model.train(was_training)


def gradient_features(model: nn.Module, pool: SourcePool, sketch: CountSketch, parameters: list[nn.Parameter],
                      precision: str, pad_id: int, progress=None) -> torch.Tensor:
    """(examples × sketch.dim) projected per-example gradients."""
    rows = [sketch.project(list(grads)) for grads in example_gradients(model, pool, parameters, precision, pad_id,
                                                                       progress)]
    return torch.stack(rows)


def cosine_to_mean(features: torch.Tensor, reference_features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row of `features` to the mean row of `reference_features`."""
    target = reference_features.double().mean(dim=0)
    features = features.double()
    return (features @ target) / (features.norm(dim=1) * target.norm()).clamp(min=1e-30)
