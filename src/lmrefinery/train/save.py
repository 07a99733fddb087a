"""Saving a (possibly FSDP2-sharded) model in Hugging Face format, loadable by AutoModelForCausalLM."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lmrefinery.fileio import atomic_directory
from lmrefinery.train.distributed import DistEnv, barrier


def save_hf_model(model: nn.Module, tokenizer, directory: Path, env: DistEnv) -> None:
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        with atomic_directory(directory) as tmp:
            model.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
    barrier(env)
