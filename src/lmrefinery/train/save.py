"""Saving a (possibly FSDP2-sharded) model in Hugging Face format, loadable by AutoModelForCausalLM."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lmrefinery.errors import UserError
from lmrefinery.fileio import atomic_directory
from lmrefinery.models.lora import merged_state, write_adapter
from lmrefinery.train.distributed import DistEnv, barrier, broadcast_object


def tied_duplicates(model: nn.Module) -> set[str]:
    """Names of parameters that are another parameter under a second name (a head tied to the embedding)."""
    seen: dict[int, str] = {}
    duplicates = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            duplicates.add(name)
        else:
            seen[id(parameter)] = name
    return duplicates


def _gathered_state(model: nn.Module) -> dict:
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for name in tied_duplicates(model):
        state.pop(name, None)
    return state


def _write_on_rank0(directory: Path, env: DistEnv, write, what: str) -> None:
    """`write(tmp)` on rank 0 into a temporary directory renamed to `directory`; a failed write is a UserError on
    every rank."""
    failure = None
    if env.is_main:
        try:
            with atomic_directory(directory) as tmp:
                write(tmp)
        except OSError as exc:
            failure = f"{getattr(exc, 'filename', None) or directory}: cannot write the {what} ({exc.strerror or exc})"
    failure = broadcast_object(failure, env)
    if failure is not None:
        raise UserError(failure)
    barrier(env)


def save_hf_model(model: nn.Module, tokenizer, directory: Path, env: DistEnv) -> None:
    """The gathered full state dict, each tied weight once (a sharded model's gathered state holds separate copies,
    so `save_pretrained` could not see the tie itself): the same files from 1 process as from N."""
    state = _gathered_state(model)

    def write(tmp):
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
    _write_on_rank0(directory, env, write, "model")


def save_lora(model: nn.Module, tokenizer, adapter_directory: Path, env: DistEnv, adapter: str = "default",
              merged_directory: Path | None = None) -> None:
    """A PeftModel's `adapter` in peft's format (+ the tokenizer) and, when `merged_directory` is given, base +
    adapter merged as a plain HF model there. Gathered first, so 1 and N processes write the same files."""
    state = _gathered_state(model)

    def write_adapter_files(tmp):
        write_adapter(model, state, adapter, Path(tmp))
        tokenizer.save_pretrained(tmp)
    _write_on_rank0(adapter_directory, env, write_adapter_files, "adapter")
    if merged_directory is not None:
        base = model.get_base_model()

        def write_merged(tmp):
            merged = merged_state(model, state, adapter)
            for name in tied_duplicates(base):
                merged.pop(name, None)
            base.save_pretrained(tmp, state_dict=merged)
            tokenizer.save_pretrained(tmp)
        _write_on_rank0(merged_directory, env, write_merged, "merged model")
