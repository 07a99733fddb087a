"""Padding examples into tensors, and splitting a global batch over ranks and micro-batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmrefinery.data.token_columns import TokenizedExample
from lmrefinery.data.tokenize import IGNORE_INDEX


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE_INDEX on prompt and padding
    source_ids: torch.Tensor  # [B]
    example_ids: torch.Tensor | None = None  # [B] positions in the pool, when the caller needs them (distill)

    def to(self, device) -> "Batch":
        moved = [t.to(device, non_blocking=True) for t in
                 (self.input_ids, self.attention_mask, self.labels, self.source_ids)]
        return Batch(*moved, self.example_ids)

    @property
    def supervised_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def collate(examples: list[TokenizedExample], pad_id: int, example_ids: list[int] | None = None) -> Batch:
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return Batch(input_ids, mask, labels, torch.tensor([e.source_id for e in examples], dtype=torch.long),
                 torch.tensor(example_ids, dtype=torch.long) if example_ids is not None else None)


def rank_micro_batches(global_batch: list[int], rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    """This rank's share of a global batch (strided), cut into micro-batches.

    The union over ranks is the whole global batch, so a token-normalised loss summed over ranks does not depend
    on the world size or the micro-batch size.
    """
    share = global_batch[rank::world_size]
    return [share[i: i + micro_batch_size] for i in range(0, len(share), micro_batch_size)]
