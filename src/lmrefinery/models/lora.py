"""LoRA adapters through peft: one frozen base model, one or several adapters, each trained on its own.

`add_lora` wraps a loaded model in a peft `PeftModel` with the named adapters; the first adapter is created by peft
(kaiming-uniform A, zero B, so the model starts as the base) and the others start as copies of it — for ScaleBiO that
is u = w at step 0, as with two full copies. Every adapter stays trainable (peft's `set_adapter` would freeze the
inactive ones; we undo that) so that checkpoints and optimizers see a fixed set of trainable parameters; an inactive
adapter simply gets no gradient, because it is not in the forward pass.

`AdapterView` presents one adapter of the shared model as a module of its own — what ScaleBiO's core takes as u or
w: calling it runs the shared model with that adapter active, its parameters are that adapter's only (so its
optimizer and gradient clipping see only them), its state dict is that adapter's weights.

Saving (`adapter_state`, `merged_state`) works from a gathered full state dict, so 1 and N processes (FSDP2) write the
same files: the adapter in peft's format (adapter_config.json + adapter_model.safetensors, loadable with
`PeftModel.from_pretrained`), and on request base + adapter merged into a plain model, W + (alpha / r)·B·A per
adapted linear layer — what peft's `merge_and_unload` computes (tests/test_lora.py checks the equality).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lmrefinery.config import LoRAConfig
from lmrefinery.errors import UserError


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("lora.enabled needs peft (pip install 'lmrefinery[lora]')") from None
    return peft


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def lora_parameters(model: nn.Module, adapter: str | None = None) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every LoRA weight, or of one adapter's."""
    return [(name, p) for name, p in model.named_parameters()
            if ".lora_" in name and (adapter is None or f".{adapter}." in name or name.endswith(f".{adapter}"))]


def add_lora(model: nn.Module, settings: LoRAConfig, adapters: tuple[str, ...] = ("default",),
             seed: int = 0) -> nn.Module:
    """`model` (a HF causal LM) as a PeftModel with LoRA adapters `adapters`, the base frozen. The adapters' random
    initialisation comes from `seed` alone, not from the process's RNG: every process of a torchrun job (whose RNGs
    are seeded per rank) builds the same adapters before FSDP shards them, as one process would."""
    peft = _peft()
    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=settings.target_modules, task_type="CAUSAL_LM")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            wrapped = peft.get_peft_model(model, config, adapter_name=adapters[0])
    except ValueError as exc:  # e.g. target_modules naming no module of this model
        raise UserError(f"lora: {str(exc).splitlines()[0]}") from None
    first = dict(lora_parameters(wrapped, adapters[0]))
    for name in adapters[1:]:
        wrapped.add_adapter(name, config)
        with torch.no_grad():
            for parameter_name, parameter in lora_parameters(wrapped, name):
                parameter.copy_(first[parameter_name.replace(f".{name}.", f".{adapters[0]}.")])
    for _, parameter in lora_parameters(wrapped):  # add_adapter leaves a new adapter frozen
        parameter.requires_grad_(True)
    return wrapped


def activate(model: nn.Module, adapter: str) -> None:
    """Make `adapter` the one the forward pass uses, leaving every adapter trainable."""
    if getattr(model, "active_adapter", None) == adapter:
        return
    model.set_adapter(adapter)
    for _, parameter in lora_parameters(model):
        parameter.requires_grad_(True)


class AdapterView(nn.Module):
    """One adapter of a shared PeftModel as a module of its own (see the module docstring)."""

    def __init__(self, shared: nn.Module, adapter: str):
        super().__init__()
        object.__setattr__(self, "shared", shared)  # not a submodule: its parameters are not ours
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        activate(self.shared, self.adapter)
        return self.shared(*args, **kwargs)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, parameter in lora_parameters(self.shared, self.adapter):
            yield prefix + name, parameter

    def get_output_embeddings(self):
        return self.shared.get_output_embeddings()

    def train(self, mode: bool = True):
        self.shared.train(mode)
        return super().train(mode)

    def state_dict(self, *args, **kwargs) -> dict:
        return {name: parameter.detach().clone() for name, parameter in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        own = dict(self.named_parameters())
        if strict and set(state) != set(own):
            raise KeyError(f"adapter {self.adapter}: state dict keys differ from the adapter's")
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)


def adapter_state(model: nn.Module, full_state: dict, adapter: str) -> dict:
    """peft's saved form of one adapter from a gathered full state dict of the PeftModel."""
    return _peft().get_peft_model_state_dict(model, state_dict=full_state, adapter_name=adapter)


def write_adapter(model: nn.Module, full_state: dict, adapter: str, directory: Path) -> None:
    """adapter_config.json + adapter_model.safetensors in `directory`, as PeftModel.save_pretrained writes them."""
    from safetensors.torch import save_file

    state = {name: tensor.contiguous() for name, tensor in adapter_state(model, full_state, adapter).items()}
    save_file(state, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    model.peft_config[adapter].save_pretrained(str(directory))


def merged_state(model: nn.Module, full_state: dict, adapter: str) -> dict:
    """The base model's state dict (its own key names) with `adapter` merged: W + (alpha / r)·B·A."""
    config = model.peft_config[adapter]
    scale = config.lora_alpha / config.r
    prefix = "base_model.model."
    merged, deltas = {}, {}
    for name, tensor in full_state.items():
        if ".lora_" in name:
            if f".lora_A.{adapter}." in name or f".lora_B.{adapter}." in name:
                deltas.setdefault(name.split(".lora_")[0], {})[name.split(".lora_")[1][0]] = tensor
            elif ".lora_A." not in name and ".lora_B." not in name:
                raise UserError(f"lora: cannot merge {name} (only adapters on linear layers merge)")
            continue
        merged[name.removeprefix(prefix).replace(".base_layer.", ".")] = tensor
    for module_name, pair in deltas.items():
        key = module_name.removeprefix(prefix) + ".weight"
        base = merged[key]
        delta = (pair["B"].double() @ pair["A"].double()) * scale
        merged[key] = (base.double() + delta).to(base.dtype)
    return merged


def read_adapter_config(location: str) -> dict | None:
    """The adapter_config.json of a directory holding a peft adapter, else None."""
    path = Path(location) / "adapter_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def load_adapter_merged(base: nn.Module, location: str) -> nn.Module:
    """`base` with the peft adapter at `location` merged in (peft's own loading and merging)."""
    peft = _peft()
    try:
        return peft.PeftModel.from_pretrained(base, location).merge_and_unload()
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{location}: cannot load the LoRA adapter ({str(exc).splitlines()[0]})") from None
