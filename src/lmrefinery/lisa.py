"""LISA — layerwise importance sampled AdamW (docs/methods/lisa.md), with optimizer state that really shrinks.

Every `interval` optimizer steps all decoder blocks are frozen and `layers` of them, drawn uniformly without
replacement, are unfrozen; the embedding, LM head and final norm (everything outside the blocks) stay trainable
unless switched off. The AdamW state (exp_avg, exp_avg_sq, step) of each block that is switched off is freed, so the
optimizer holds state for only the active blocks at any time; a block activated again starts from fresh state (bias
correction included). `keep_state=True` keeps the state of inactive blocks instead, for comparison.

The optimizer must be built over *all* parameters (frozen ones included) so that any block can be updated when it is
activated; the constructor checks this. Call `step()` once after every optimizer step — switches therefore never
happen inside a gradient-accumulation window.
"""

from __future__ import annotations

import torch
from torch import nn

from lmrefinery.models.layers import find_decoder_layers
from lmrefinery.train.distributed import local_shard


def _tied_embedding(model: nn.Module) -> bool:
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    return embeddings is not None and head is not None and embeddings.weight is head.weight


class LISA:
    """Layerwise importance sampling for an optimizer built over all of `model`'s parameters: `layers` decoder blocks
    trainable at a time, redrawn every `interval` steps (call `step()` after each optimizer step); the optimizer state
    of switched-off blocks is freed. `state_dict()` / `load_state_dict()` resume the same draws."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, layers: int = 2, interval: int = 20,
                 train_embeddings: bool = True, train_head: bool = True, keep_state: bool = False, seed: int = 0,
                 state: dict | None = None):
        self.blocks = find_decoder_layers(model)
        if not 1 <= layers <= len(self.blocks):
            raise ValueError(f"LISA layers={layers} must be between 1 and the number of decoder blocks "
                             f"({len(self.blocks)})")
        if interval < 1:
            raise ValueError(f"LISA interval={interval} must be at least 1")
        if _tied_embedding(model) and train_head != train_embeddings:
            raise ValueError("this model ties its LM head to the input embedding (one matrix): train_head and "
                             "train_embeddings must be equal")
        self.model, self.optimizer = model, optimizer
        self.layers, self.interval, self.keep_state = layers, interval, keep_state
        self.block_params = [list(block.parameters()) for block in self.blocks]
        self.always_on = self._always_on_parameters(train_embeddings, train_head)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = sum(1 for params in self.block_params for p in params if id(p) not in in_optimizer)
        if missing:
            raise ValueError(f"{missing} decoder-block parameters are not in the optimizer; build it over all "
                             f"parameters (frozen ones too), or activated blocks would never be updated")
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_taken = 0
        self.active: list[int] = []
        self.switches = 0
        if state is not None:
            self.load_state_dict(state)
        else:
            self._activate(self._draw())

    def _always_on_parameters(self, train_embeddings: bool, train_head: bool) -> dict[int, bool]:
        """id(param) → whether it trains, for every parameter outside the decoder blocks."""
        in_blocks = {id(p) for params in self.block_params for p in params}
        embeddings = self.model.get_input_embeddings()
        head = self.model.get_output_embeddings()
        embedding_ids = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        decisions = {}
        for parameter in self.model.parameters():
            if id(parameter) in in_blocks:
                continue
            if id(parameter) in embedding_ids:
                decisions[id(parameter)] = train_embeddings
            elif id(parameter) in head_ids:
                decisions[id(parameter)] = train_head
            else:  # final norm, position embeddings and other small glue
                decisions[id(parameter)] = True
        return decisions

    def _draw(self) -> list[int]:
        return sorted(torch.randperm(len(self.blocks), generator=self.generator)[: self.layers].tolist())

    def _activate(self, active: list[int]) -> None:
        for parameter in self.model.parameters():
            if id(parameter) in self.always_on:
                parameter.requires_grad_(self.always_on[id(parameter)])
        for index, params in enumerate(self.block_params):
            on = index in active
            for parameter in params:
                parameter.requires_grad_(on)
                if not on:
                    parameter.grad = None
                    if not self.keep_state:
                        self.optimizer.state.pop(parameter, None)
        self.active = list(active)

    def step(self) -> bool:
        """Call after every optimizer step; returns True when this call switched the active blocks."""
        self.steps_taken += 1
        if self.steps_taken % self.interval:
            return False
        self._activate(self._draw())
        self.switches += 1
        return True

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def optimizer_state_bytes(self) -> int:
        """Bytes held by the optimizer state on this process (the local shard under FSDP)."""
        total = 0
        for state in self.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    local = local_shard(value)
                    total += local.numel() * local.element_size()
        return total

    def summary(self) -> dict:
        return {"active_layers": list(self.active), "trainable_parameters": self.trainable_parameters(),
                "optimizer_state_bytes": self.optimizer_state_bytes()}

    def state_dict(self) -> dict:
        """JSON-serialisable: the active blocks, the step counter and the sampling RNG."""
        return {"active": list(self.active), "steps_taken": self.steps_taken, "switches": self.switches,
                "generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.steps_taken = int(state["steps_taken"])
        self.switches = int(state.get("switches", 0))
        self._activate([int(i) for i in state["active"]])


# ---- Hugging Face Trainer / TRL integration ------------------------------------------------------------------------

from transformers import TrainerCallback  # noqa: E402  (kept below the core so the algorithm reads first)
from transformers.trainer_callback import ExportableState  # noqa: E402


class LISACallback(TrainerCallback, ExportableState):
    """LISA for `transformers.Trainer` (and TRL trainers built on it), with the same semantics as `LISA`.

    The Trainer builds its optimizer over all trainable parameters before `on_train_begin`, when nothing is frozen
    yet, so every block is covered. `on_step_end` runs once per optimizer step. To resume the same active blocks and
    sampling RNG, pass `restore_callback_states_from_checkpoint=True` in TrainingArguments. `history` holds one entry
    per period: step, active layers, trainable parameters, optimizer-state bytes.
    """

    def __init__(self, layers: int = 2, interval: int = 20, train_embeddings: bool = True, train_head: bool = True,
                 keep_state: bool = False, seed: int = 0):
        self.settings = {"layers": layers, "interval": interval, "train_embeddings": train_embeddings,
                         "train_head": train_head, "keep_state": keep_state, "seed": seed}
        self.lisa: LISA | None = None
        self.resume_state: dict | None = None
        self.history: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        self.lisa = LISA(model, optimizer, state=self.resume_state, **self.settings)
        self.history.append({"step": state.global_step, **self.lisa.summary()})

    def on_step_end(self, args, state, control, **kwargs):
        if self.lisa is not None and self.lisa.step():
            self.history.append({"step": state.global_step, **self.lisa.summary()})

    def state(self) -> dict:
        return {"args": dict(self.settings),
                "attributes": {"resume_state": self.lisa.state_dict() if self.lisa is not None else None}}
