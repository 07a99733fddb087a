"""Padding examples into tensors, and splitting a global batch over ranks and micro-batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmrefinery.data.packing import PackedRows, pack
from lmrefinery.data.token_columns import TokenizedExample
from lmrefinery.data.tokenize import IGNORE_INDEX


@dataclass
class Batch:
    """One example per row (the logical view every loss reads), and optionally the packed rows the model runs on."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE_INDEX on prompt and padding
    source_ids: torch.Tensor  # [B]
    example_ids: torch.Tensor | None = None  # [B] positions in the pool, when the caller needs them (distill)
    packed: PackedRows | None = None  # set by collate(pack=True): the forward runs on these rows (data/packing.py)

    def to(self, device) -> "Batch":
        moved = [t.to(device, non_blocking=True) for t in
                 (self.input_ids, self.attention_mask, self.labels, self.source_ids)]
        return Batch(*moved, self.example_ids, self.packed.to(device) if self.packed is not None else None)

    @property
    def supervised_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def forward_positions(self) -> int:
        """Token positions the forward pass computes: the packed rows' when packed, else the padded batch's."""
        return (self.packed.input_ids if self.packed is not None else self.input_ids).numel()

    @property
    def padded_tokens(self) -> int:
        """Padding among the forward's positions."""
        return self.forward_positions - int(self.attention_mask.sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model's forward: packed rows with restarting position ids and no attention
        mask (transformers then keeps attention within each example), or the padded batch with its mask."""
        if self.packed is not None:
            return {"input_ids": self.packed.input_ids, "position_ids": self.packed.position_ids}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def hidden_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Where the logical positions `positions` (bool [B, T]) are among the forward's hidden states: the mask
        itself, or (packed) their indices into the flattened rows, in the same row-major logical order."""
        if self.packed is None:
            return positions
        return self.packed.flat_index[positions.to(self.packed.flat_index.device)]


def collate(examples: list[TokenizedExample], pad_id: int, example_ids: list[int] | None = None,
            pack_rows: bool = False) -> Batch:
    """Right-padded [B, T] tensors; with `pack_rows`, also the examples packed several to a row (data/packing.py)."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    packed = pack(input_ids, [len(e.input_ids) for e in examples], pad_id) if pack_rows else None
    return Batch(input_ids, mask, labels, torch.tensor([e.source_id for e in examples], dtype=torch.long),
                 torch.tensor(example_ids, dtype=torch.long) if example_ids is not None else None, packed)


def rank_micro_batches(global_batch: list[int], rank: int, world_size: int, micro_batch_size: int,
                       lengths: Sequence[int] | np.ndarray | None = None) -> list[list[int]]:
    """This rank's share of a global batch (strided), cut into micro-batches.

    The union over ranks is the whole global batch, so a token-normalised loss summed over ranks does not depend
    on the world size or the micro-batch size. Given every example's token count (`lengths`, indexed like the pool),
    a share cut into several micro-batches is ordered by length first (stable: ties keep the sampler's order), so each
    micro-batch holds examples of similar length and pads less. The step's gradient is the same sum over the same
    examples, only added in another order; the ranks' shares are unchanged.
    """
    share = global_batch[rank::world_size]
    if lengths is not None and len(share) > micro_batch_size:
        share = sorted(share, key=lambda index: int(lengths[index]))
    return [share[i: i + micro_batch_size] for i in range(0, len(share), micro_batch_size)]
