"""Students: a model of its own, or the teacher with only some of its decoder blocks (a common distillation init)."""

from __future__ import annotations

import copy

from torch import nn

from lmrefinery.models.layers import find_decoder_layers


def _parent_of(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for module in model.modules():
        for name, child in module.named_children():
            if child is target:
                return module, name
    raise ValueError("decoder block list has no parent module")


def keep_layers(teacher: nn.Module, keep: list[int], in_place: bool = False) -> nn.Module:
    """`teacher` with only the decoder blocks at indices `keep` (embeddings, final norm, head kept) — a copy, or with
    `in_place=True` the teacher itself, cut down: no second full model in memory (a 13B teacher in fp32 is 52 GB;
    a deep copy would hold two while the student is built).

    The config is updated (num_hidden_layers and any per-layer list such as layer_types), and each kept block's
    layer index is renumbered so caches and per-layer settings stay consistent; the result saves and loads with
    save_pretrained / from_pretrained.
    """
    blocks = find_decoder_layers(teacher)
    if not keep or sorted(set(keep)) != sorted(keep) or min(keep) < 0 or max(keep) >= len(blocks):
        raise ValueError(f"keep_layers must be distinct block indices in [0, {len(blocks)}), got {keep}")
    student = teacher if in_place else copy.deepcopy(teacher)
    student_blocks = find_decoder_layers(student)
    parent, attribute = _parent_of(student, student_blocks)
    kept = nn.ModuleList([student_blocks[i] for i in sorted(keep)])
    setattr(parent, attribute, kept)
    config = student.config
    old = config.num_hidden_layers
    for name, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == old:  # per-layer settings, e.g. layer_types
            setattr(config, name, [value[i] for i in sorted(keep)])
    config.num_hidden_layers = len(kept)
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    return student


def every_nth(total: int, step: int) -> list[int]:
    return list(range(0, total, step))
