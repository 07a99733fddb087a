"""Decoder-layer discovery that works across architectures, without model-type strings.

LISA and ScaleBiO freeze and sample decoder blocks, and FSDP2 shards per block, so every model family needs its block
list found reliably. Known attribute paths come first (they are unambiguous); otherwise the largest `nn.ModuleList`
whose members all share one class is taken.
"""

from __future__ import annotations

from torch import nn

KNOWN_BLOCK_PATHS = (
    "model.layers",          # Llama, Mistral, Qwen2, Gemma, Gemma2, Phi-3, most recent families
    "model.language_model.layers",
    "transformer.h",         # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",       # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.blocks",    # MPT
    "layers",
)


def _get(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _uniform_blocks(candidate) -> bool:
    return isinstance(candidate, nn.ModuleList) and len(candidate) > 0 and len({type(m) for m in candidate}) == 1


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the model's list of decoder blocks (the repeated transformer layers)."""
    for path in KNOWN_BLOCK_PATHS:
        candidate = _get(model, path)
        if _uniform_blocks(candidate):
            return candidate
    best = None
    for _, module in model.named_modules():
        if _uniform_blocks(module) and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise ValueError(f"{type(model).__name__}: no list of repeated decoder blocks found")
    return best


def decoder_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the decoder blocks, e.g. ['model.layers.0', ...]."""
    blocks = {id(block) for block in find_decoder_layers(model)}
    return [name for name, module in model.named_modules() if id(module) in blocks]
