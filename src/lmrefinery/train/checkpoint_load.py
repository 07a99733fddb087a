"""Reading a checkpoint back: into live (possibly FSDP2-sharded) modules and optimizers at this run's number of
processes, whatever the number that wrote it (torch.distributed.checkpoint reassembles and reshards from the offsets
each shard records), or as whole tensors for inspection. Nothing is unpickled: safetensors and JSON only."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from lmrefinery.errors import UserError
from lmrefinery.models.lora import is_peft_model
from lmrefinery.train.checkpoint_format import (FORMAT, local_options, one_process_is_intended,
                                                read_checkpoint_state, single_process)
from lmrefinery.train.distributed import DistEnv
from lmrefinery.train.rng import set_rng_state
from lmrefinery.train.state_tree import join_tensors, tensor_keys

# Optimizer state may legitimately be absent for trainable parameters: LISA frees it for inactive blocks, and a block
# activated at a checkpoint boundary has none yet.
RESTORE_OPTIMIZER = StateDictOptions(strict=False)


def _layout(directory: Path) -> dict:
    layout = read_checkpoint_state(directory).get("layout")
    if not layout or layout.get("format") != FORMAT:
        raise UserError(f"{directory}: a checkpoint in an earlier format (gathered weights and pickled optimizer "
                        f"state) that this version does not read: start the run again without --resume")
    return layout


def _saved_tensors(directory: Path) -> tuple[HuggingFaceStorageReader, dict]:
    """The reader of a checkpoint's shards and, per tensor, its full size and dtype (from the shards' headers)."""
    reader = HuggingFaceStorageReader(str(directory))
    try:
        metadata = reader.read_metadata()
    except Exception as exc:  # a damaged or foreign shard file: safetensors refuses it without executing anything
        raise UserError(f"{directory}: not a readable checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else 'unreadable shard'})") from None
    return reader, {key: (item.size, item.properties.dtype) for key, item in metadata.state_dict_metadata.items()}


def _empty_like_saved(key: str, saved: dict, parameter: torch.Tensor | None = None) -> torch.Tensor:
    """Where a saved tensor is read into: shaped like the live parameter it belongs to (so under FSDP2 each rank
    reads only its shard), else a whole tensor of the saved size."""
    if key not in saved:
        raise UserError(f"{key}: listed in the checkpoint's state.json but in none of its shard files")
    size, dtype = saved[key]
    if parameter is not None and tuple(parameter.shape) == tuple(size):
        return torch.zeros_like(parameter, dtype=dtype, requires_grad=False)
    return torch.zeros(size, dtype=dtype)


def _read(directory: Path, modules: dict[str, nn.Module], optimizers: dict, layout: dict,
          with_optimizers: bool = True) -> tuple[dict, dict]:
    """Read a checkpoint's tensors into place: (module name → state dict, optimizer name → state dict); ScaleBiO's
    objects, when present, under the key None of the second."""
    reader, saved = _saved_tensors(directory)
    targets: dict[str, torch.Tensor] = {}
    live_states = {}
    for name, module in modules.items():
        live = get_model_state_dict(module, options=local_options(module))
        entry = layout["modules"].get(name)
        unknown = [fqn for fqn in (entry or {"keys": ["?"]})["keys"] if fqn not in live]
        if entry is None or unknown:
            raise UserError(f"{directory}: its {name!r} weights do not fit this model "
                            f"({'absent' if entry is None else 'unknown key ' + unknown[0]})")
        live_states[name] = live
        targets.update({f"module/{name}/{fqn}": live[fqn] for fqn in entry["keys"]})
    skeletons = {name: layout["optimizers"][name] for name in optimizers} if with_optimizers else {}
    for name, skeleton in skeletons.items():
        parameters = dict(optimizers[name][0].named_parameters())
        for key in tensor_keys(skeleton):
            parts = key.split("/")  # optimizer/<name>/state/<fqn>/<slot>
            parameter = parameters.get(parts[3]) if len(parts) == 5 and parts[2] == "state" else None
            targets[key] = _empty_like_saved(key, saved, parameter)
    if with_optimizers and layout.get("objects") is not None:
        targets.update({key: _empty_like_saved(key, saved) for key in tensor_keys(layout["objects"])})
    with one_process_is_intended():
        dcp.load(targets, storage_reader=reader, no_dist=single_process())
    states = {}
    for name, live in live_states.items():
        entry = layout["modules"][name]
        states[name] = {fqn: targets[f"module/{name}/{fqn}"] for fqn in entry["keys"]}
        states[name].update({alias: states[name][original] for alias, original in entry["aliases"].items()})
    restored = {name: join_tensors(skeleton, targets) for name, skeleton in skeletons.items()}
    if with_optimizers and layout.get("objects") is not None:
        restored[None] = join_tensors(layout["objects"], targets)
    return states, restored


def _drop_state_not_in(module: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Loading initialises state (a zero-gradient step: step = 1, zero moments) for every trainable parameter; a
    parameter that had no state when saved (a block LISA had just activated) must come back with none."""
    saved_names = set(saved.get("state", {}))
    for name, parameter in module.named_parameters():
        if name not in saved_names:
            optimizer.state.pop(parameter, None)


def load_checkpoint(directory: Path, env: DistEnv, modules: dict[str, nn.Module],
                    optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]]) -> dict:
    """Restore what save_checkpoint wrote into live (possibly sharded) modules, at this run's number of processes;
    return the JSON state."""
    layout = _layout(directory)
    missing = sorted(set(optimizers) - set(layout["optimizers"]))
    if missing:
        raise UserError(f"{directory}: holds no state for the optimizer {missing[0]!r}")
    states, restored = _read(directory, modules, optimizers, layout)
    for name, module in modules.items():
        set_model_state_dict(module, states[name], options=StateDictOptions(strict=not is_peft_model(module)))
    for name, (module, optimizer) in optimizers.items():
        set_optimizer_state_dict(module, optimizer, restored[name], options=RESTORE_OPTIMIZER)
        _drop_state_not_in(module, optimizer, restored[name])
    state = read_checkpoint_state(directory)
    state.pop("layout")
    if None in restored:
        state["objects"] = restored[None]
    rng_file = directory / f"rng-rank{env.rank}.json"
    if state.get("world_size") == env.world_size:
        set_rng_state(json.loads(rng_file.read_text()))
    return state


def load_module_weights(directory: Path, modules: dict[str, nn.Module]) -> None:
    """Only the weights of a checkpoint's modules (e.g. the best-validation step's, to save as the final model)."""
    states, _ = _read(directory, modules, {}, _layout(directory), with_optimizers=False)
    for name, module in modules.items():
        set_model_state_dict(module, states[name], options=StateDictOptions(strict=not is_peft_model(module)))


def full_tensors(directory: Path, prefix: str = "module/model/") -> dict[str, torch.Tensor]:
    """The whole tensors under `prefix` in a checkpoint, reassembled from every rank's shards, keyed without the
    prefix (one process; for inspection, tests and conversions). `module/<name>/` gives a module's weights."""
    reader, saved = _saved_tensors(Path(directory))
    targets = {key: torch.zeros(size, dtype=dtype) for key, (size, dtype) in saved.items() if key.startswith(prefix)}
    with one_process_is_intended():
        dcp.load(targets, storage_reader=reader, no_dist=True)
    return {key[len(prefix):]: tensor for key, tensor in targets.items()}
