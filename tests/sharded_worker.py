"""Run under torchrun: a tiny FSDP2 model (Qwen2-style, tied head) after two AdamW steps, checkpointed by
save_checkpoint and — to compare with — gathered whole through PyTorch's state-dict API; rank 0 writes the gathered
state as `gathered.safetensors` (weights under `module/model/`, optimizer tensors under `optimizer/model/`)."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from lmrefinery.train.checkpoint import save_checkpoint
from lmrefinery.train.distributed import setup_distributed, shard_model, teardown_distributed
from lmrefinery.train.optim import build_optimizer
from lmrefinery.train.state_tree import split_tensors
from tests.tiny import tiny_model

OBJECTS = {"scalebio": {"logits": torch.tensor([0.5, -0.25, 1.0], dtype=torch.float64), "steps_done": 2}}


def trained(env, family: str = "qwen2"):
    model = shard_model(tiny_model(family, seed=0), env)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(env.rank)
    for _ in range(2):
        ids = torch.randint(0, 320, (2, 12), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def main(out: Path) -> None:
    env = setup_distributed()
    model, optimizer = trained(env)
    save_checkpoint(out, 2, env, {"model": model}, {"model": (model, optimizer)}, {"note": "sharded"}, keep_last=1,
                    objects=OBJECTS)
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=whole)
    _, slots = split_tensors(get_optimizer_state_dict(model, optimizer, options=whole), "optimizer/model")
    if env.is_main:
        tensors = {f"module/model/{key}": value.clone() for key, value in weights.items()}
        save_file(tensors | {key: value.clone() for key, value in slots.items()}, str(out / "gathered.safetensors"))
    teardown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
