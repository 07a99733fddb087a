"""A nested state (an optimizer's state dict, ScaleBiO's λ and its optimizer) split into its tensors, keyed by their
path, and a JSON skeleton holding everything else — so a checkpoint stores tensors in safetensors and the rest as
JSON, and nothing in it needs unpickling to be read back.

The skeleton keeps what JSON would lose: a tensor is `{"__tensor__": key}`, a dict with integer keys (an optimizer's
`state` is keyed by parameter index) is `{"__int_keys__": {...}}`, a tuple (Adam's `betas`) is `{"__tuple__": [...]}`.
"""

from __future__ import annotations

import torch

TENSOR, INT_KEYS, TUPLE = "__tensor__", "__int_keys__", "__tuple__"


def split_tensors(tree, prefix: str) -> tuple[object, dict[str, torch.Tensor]]:
    """(skeleton, {path: tensor}); paths are `prefix/key/key/...`."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, path: str):
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return {TENSOR: path}
        if isinstance(node, dict):
            if all(isinstance(key, str) for key in node):
                return {key: walk(value, f"{path}/{key}") for key, value in node.items()}
            if all(isinstance(key, int) and not isinstance(key, bool) for key in node):
                return {INT_KEYS: {str(key): walk(value, f"{path}/{key}") for key, value in node.items()}}
            raise TypeError(f"{path}: dict keys must be all strings or all integers")
        if isinstance(node, tuple):
            return {TUPLE: [walk(value, f"{path}/{i}") for i, value in enumerate(node)]}
        if isinstance(node, list):
            return [walk(value, f"{path}/{i}") for i, value in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"{path}: {type(node).__name__} cannot be stored in a checkpoint (tensors and plain values)")

    return walk(tree, prefix), tensors


def tensor_keys(skeleton) -> list[str]:
    """Every tensor path a skeleton refers to, in order."""
    keys: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if TENSOR in node:
                keys.append(node[TENSOR])
            else:
                for value in node.values():
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(skeleton)
    return keys


def join_tensors(skeleton, tensors: dict[str, torch.Tensor]):
    """The inverse of split_tensors."""
    if isinstance(skeleton, dict):
        if TENSOR in skeleton:
            return tensors[skeleton[TENSOR]]
        if INT_KEYS in skeleton:
            return {int(key): join_tensors(value, tensors) for key, value in skeleton[INT_KEYS].items()}
        if TUPLE in skeleton:
            return tuple(join_tensors(value, tensors) for value in skeleton[TUPLE])
        return {key: join_tensors(value, tensors) for key, value in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tensors(value, tensors) for value in skeleton]
    return skeleton
