"""Loading tokenizers and causal LMs by hub id, local directory, or a built-in alias."""

from __future__ import annotations

import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmrefinery.config import ModelConfig
from lmrefinery.errors import UserError
from lmrefinery.models import embedded

log = logging.getLogger(__name__)


def resolve_model_path(name_or_path: str) -> str:
    """Local directories and hub ids pass through; built-in aliases become their cached local directory."""
    if name_or_path in embedded.ALIASES:
        return str(embedded.ALIASES[name_or_path]())
    return name_or_path


def _from_pretrained(loader, location: str, what: str, **kwargs):
    try:
        return loader.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise UserError(f"{location}: cannot load the {what} ({message})") from None


def load_tokenizer(config: ModelConfig):
    location = resolve_model_path(config.tokenizer or config.name_or_path)
    tokenizer = _from_pretrained(AutoTokenizer, location, "tokenizer", trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: ModelConfig, device: torch.device | str = "cpu"):
    """The model in fp32 (master weights); bf16 compute is applied by autocast, never by casting the weights."""
    location = resolve_model_path(config.name_or_path)
    kwargs = {"dtype": torch.float32, "trust_remote_code": config.trust_remote_code}
    if config.attn_implementation is not None:
        kwargs["attn_implementation"] = config.attn_implementation
    if config.device_map is not None:
        kwargs["device_map"] = config.device_map
    model = _from_pretrained(AutoModelForCausalLM, location, "model", **kwargs)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model if config.device_map is not None else model.to(device)


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant checkpointing: frozen blocks (LISA) and inputs without grad still get correct gradients."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
