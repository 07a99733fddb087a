"""Loading tokenizers and causal LMs by hub id, local directory, or a built-in alias."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmrefinery.config import ModelConfig
from lmrefinery.errors import UserError
from lmrefinery.models import embedded
from lmrefinery.models.layers import find_decoder_layers
from lmrefinery.models.lora import load_adapter_merged, read_adapter_config

log = logging.getLogger(__name__)


def resolve_model_path(name_or_path: str) -> str:
    """Local directories and hub ids pass through; built-in aliases become their cached local directory."""
    if name_or_path in embedded.ALIASES:
        return str(embedded.ALIASES[name_or_path]())
    return name_or_path


def _from_pretrained(loader, location: str, what: str, **kwargs):
    try:
        return loader.from_pretrained(location, **kwargs)
    except Exception as exc:  # noqa: BLE001 — only the ones a user's files cause become exit 2
        unreadable = isinstance(exc, (OSError, ValueError)) or type(exc).__module__.startswith("safetensors")
        if not unreadable:
            raise
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise UserError(f"{location}: cannot load the {what} ({message})") from None


def load_tokenizer(config: ModelConfig):
    location = resolve_model_path(config.tokenizer or config.name_or_path)
    adapter = read_adapter_config(location)
    if adapter is not None and not (Path(location) / "tokenizer_config.json").exists():
        location = adapter.get("base_model_name_or_path") or location  # an adapter saved without its tokenizer
    tokenizer = _from_pretrained(AutoTokenizer, location, "tokenizer", trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# Up to this many tokens per row, eager attention (plain matmuls + softmax) trains faster on CPU than torch's SDPA
# kernel; beyond it SDPA wins, by 1.25x at 512 and 1.9x at 1,024 (SmolLM2-135M, 2 cores: docs/benchmarks.md).
EAGER_ATTENTION_MAX_TOKENS_CPU = 384


def attention_kernel(config: ModelConfig, device: torch.device | str, training: bool,
                     max_length: int | None) -> str | None:
    """`attn_implementation`, with `auto` resolved: eager for training on CPU when no row is longer than
    EAGER_ATTENTION_MAX_TOKENS_CPU tokens (`max_length`, the data's cap), SDPA otherwise — for inference too, where
    eager's lead on CPU ends already near 128 tokens."""
    if config.attn_implementation != "auto":
        return config.attn_implementation
    short_rows = max_length is not None and max_length <= EAGER_ATTENTION_MAX_TOKENS_CPU
    on_cpu = config.device_map is None and torch.device(device).type == "cpu"
    return "eager" if training and on_cpu and short_rows else "sdpa"


def load_model(config: ModelConfig, device: torch.device | str = "cpu", training: bool = True,
               max_length: int | None = None):
    """The model for training in fp32 (master weights; bf16 compute is applied by autocast, never by casting the
    weights); for inference (`training=False`) in `config.load_dtype`. A directory holding a LoRA adapter (peft's
    format, as `sft`/`distill` with `lora.enabled` write it) loads as its base with the adapter merged.
    `max_length`: the longest row the model will see, for `attn_implementation: auto`."""
    if training and config.load_dtype != "float32":
        raise UserError(f"model.load_dtype={config.load_dtype}: a trained model keeps fp32 master weights (bf16 "
                        f"compute: model.precision); a bfloat16 load is for the teacher pass and evaluation")
    location = resolve_model_path(config.name_or_path)
    adapter = read_adapter_config(location)  # a LoRA adapter directory: its base, with the adapter merged in
    if adapter is not None:
        base = adapter.get("base_model_name_or_path")
        if not base:
            raise UserError(f"{location}/adapter_config.json: no base_model_name_or_path to load the adapter onto")
        base_config = config.model_copy(update={"name_or_path": base, "attn_implementation": attention_kernel(
            config, device, training, max_length)})
        merged = load_adapter_merged(load_model(base_config, "cpu", training), location)
        return merged if config.device_map is not None else merged.to(device)
    kwargs = {"dtype": getattr(torch, config.load_dtype), "trust_remote_code": config.trust_remote_code}
    kernel = attention_kernel(config, device, training, max_length)
    if kernel is not None:
        kwargs["attn_implementation"] = kernel
    if config.device_map is not None:
        kwargs["device_map"] = config.device_map
    model = _from_pretrained(AutoModelForCausalLM, location, "model", **kwargs)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if config.compile:
        compile_decoder_blocks(model)
    return model if config.device_map is not None else model.to(device)


def compile_decoder_blocks(model) -> None:
    """torch.compile each decoder block in place (`nn.Module.compile`: parameter names and state dicts unchanged).

    Blocks rather than the whole model: every block shares one graph (parameters are graph inputs), so the compile
    costs one block's worth, and what sits outside the blocks — mask building, the LM head hook, LoRA wrappers added
    later, FSDP2's per-block hooks — stays eager or is traced at the first call. Compilation is lazy (first forward)
    and `dynamic=True` keeps varying batch shapes from recompiling; freezing blocks (LISA) adds at most one graph per
    requires-grad pattern."""
    blocks = find_decoder_layers(model)
    log.info("compiling %d decoder blocks with torch.compile at the first forward", len(blocks))
    for block in blocks:
        block.compile(dynamic=True)


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant checkpointing: frozen blocks (LISA) and inputs without grad still get correct gradients."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
