"""Apply a causal LM's output head only where logits are needed.

The output embedding (LM head) maps every position's hidden state to the vocabulary: for SmolLM2 that is about a fifth
of the forward FLOPs, and with its backward and the softmax over 49k tokens more of the step. Training, the teacher
pass and evaluation need logits only at positions whose next token is supervised (for multiple-choice items: one
position in a hundred). `logits_at` hooks the head module so that it receives the hidden states of those positions
only; whatever the model does after its head (e.g. Gemma-2's logit soft-capping) is elementwise and still applies.
This works for any Hugging Face causal LM that exposes its head through `get_output_embeddings()`; a model without
one falls back to computing every position's logits and selecting.
"""

from __future__ import annotations

import torch
from torch import nn


def logits_at(model: nn.Module, positions: torch.Tensor, **inputs) -> torch.Tensor:
    """The model's logits at `positions`: a bool mask [B, T] (row-major order), or indices into the flattened
    [B·T] positions (in their order; packed rows, data/packing.py): [P, V]."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        logits = model(**inputs, use_cache=False).logits
        return _select(logits, positions)

    def select(module, args):
        return (_select(args[0], positions).unsqueeze(0),) + tuple(args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        handle.remove()
    return logits.reshape(-1, logits.shape[-1])


def _select(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    positions = positions.to(states.device)
    if positions.dtype == torch.bool:
        return states[positions]
    return states.reshape(-1, states.shape[-1])[positions]
