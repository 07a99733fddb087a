"""Packed rows: a micro-batch's examples placed several to a row, so the forward pass computes less padding.

Exactness rests on two things the model sees: position ids that restart at 0 for every example (rotary and learned
positions are then those of the example alone), and no attention mask, which is how transformers recognises packed
rows: it derives a block-diagonal causal mask from where the position ids restart (`find_packed_sequence_indices` in
its masking utilities), so no token attends across examples. A row's padding tail restarts at 0 too, so it is a
segment of its own that nothing real attends to. Whether a given architecture honours this is checked once per model
on its first packed micro-batch (`check_packing_exact`), not assumed.

Rows are filled best-fit-decreasing with a capacity equal to the micro-batch's longest example: no row is longer
than the padded batch would have been, so attention (quadratic in the row length) never costs more than unpadded
rows of the same examples, and the number of rows only falls. The batch keeps its logical, one-example-per-row view
(ids, labels, mask) for everything downstream; `flat_index` maps each logical position to its place in the packed
rows, so the head reads hidden states in the unpacked order and per-example sums are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedRows:
    input_ids: torch.Tensor     # [R, L]
    position_ids: torch.Tensor  # [R, L], restarting at 0 for every example and for the padding tail
    flat_index: torch.Tensor    # [B, T] long: logical (example, position) → index into the flattened [R·L] rows; -1 pad

    def to(self, device) -> "PackedRows":
        return PackedRows(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.position_ids,
                                                                       self.flat_index)))


def best_fit_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of total length ≤ capacity, best fit decreasing (ties keep index order,
    so the packing is a deterministic function of the lengths)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fitting = [r for r in range(len(rows)) if room[r] >= lengths[index]]
        if fitting:
            best = min(fitting, key=lambda r: (room[r], r))
            rows[best].append(index)
            room[best] -= lengths[index]
        else:
            rows.append([index])
            room.append(capacity - lengths[index])
    return rows


def pack(input_ids: torch.Tensor, lengths: list[int], pad_id: int) -> PackedRows:
    """Pack the examples of a right-padded batch ([B, T], example b's tokens in input_ids[b, :lengths[b]])."""
    capacity = max(lengths)
    rows = best_fit_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    packed = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    flat_index = torch.full(input_ids.shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for example in row:
            n = lengths[example]
            packed[r, offset: offset + n] = input_ids[example, :n]
            positions[r, offset: offset + n] = torch.arange(n)
            flat_index[example, :n] = torch.arange(r * width + offset, r * width + offset + n)
            offset += n
        positions[r, offset:] = torch.arange(width - offset)
    return PackedRows(packed, positions, flat_index)
