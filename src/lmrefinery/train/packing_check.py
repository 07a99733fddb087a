"""Packed rows are exact only if the architecture keeps attention within each example when given restarting
position ids and no attention mask (data/packing.py). That is checked on the model, once, rather than assumed: the
first packed micro-batch runs both ways and the log-probabilities must agree."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from lmrefinery.data.collate import Batch
from lmrefinery.data.tokenize import IGNORE_INDEX
from lmrefinery.errors import UserError
from lmrefinery.models.head import logits_at

CHECKED = "_lmrefinery_packing_checked"
# fp32 weights: the two layouts differ by summation order only; bf16 weights round each matmul, and a model that
# attends across examples differs by far more than either
TOLERANCE = {torch.float32: 1e-3}
LOW_PRECISION_TOLERANCE = 0.125


@torch.no_grad()
def check_packing_exact(model: nn.Module, batch: Batch) -> None:
    """On the first packed batch a model sees: its log-probabilities packed vs padded, at the supervised positions
    (or each example's last token when none is supervised). Every rank runs it on its first packed batch, so the
    forwards stay collective under FSDP. Raises UserError when the architecture does not honour packed rows."""
    if batch.packed is None or getattr(model, CHECKED, False):
        return
    positions = F.pad(batch.labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)
    if not positions.any():
        lengths = batch.attention_mask.sum(dim=1)
        positions = torch.zeros_like(positions)
        positions[torch.arange(len(lengths), device=positions.device), lengths - 1] = True
    was_training = model.training
    model.eval()  # dropout would make the two forwards differ for a reason other than the layout
    try:
        padded = logits_at(model, positions, **replace(batch, packed=None).model_inputs())
        packed = logits_at(model, batch.hidden_positions(positions), **batch.model_inputs())
    finally:
        model.train(was_training)
    difference = float((padded.float().log_softmax(-1) - packed.float().log_softmax(-1)).abs().max())
    dtype = next(model.parameters()).dtype
    tolerance = TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE)
    if not difference <= tolerance:
        name = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        raise UserError(f"packing: {name} does not keep attention within each example of a packed row (log-"
                        f"probabilities differ by {difference:.3g} from the padded batch, more than {tolerance}); set "
                        f"packing: false for this model")
    setattr(model, CHECKED, True)
