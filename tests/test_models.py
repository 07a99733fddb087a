"""Decoder-layer discovery for every tiny model family, and model loading errors."""

import pytest
from torch import nn

from lmrefinery.config import ModelConfig
from lmrefinery.errors import UserError
from lmrefinery.models import find_decoder_layers, load_model
from lmrefinery.models.layers import decoder_layer_names
from tests.tiny import FAMILIES, tiny_model

EXPECTED_BLOCK_CLASS = {"llama": "LlamaDecoderLayer", "qwen2": "Qwen2DecoderLayer", "gemma2": "Gemma2DecoderLayer",
                        "mistral": "MistralDecoderLayer", "gpt2": "GPT2Block", "phi3": "Phi3DecoderLayer"}
EXPECTED_PREFIX = {"gpt2": "transformer.h"}


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layer_discovery(family):
    model = tiny_model(family, layers=3)
    blocks = find_decoder_layers(model)
    assert len(blocks) == 3
    assert {type(b).__name__ for b in blocks} == {EXPECTED_BLOCK_CLASS[family]}
    prefix = EXPECTED_PREFIX.get(family, "model.layers")
    assert decoder_layer_names(model) == [f"{prefix}.{i}" for i in range(3)]


def test_discovery_falls_back_to_largest_uniform_module_list():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
            self.trunk = nn.Sequential()
            self.trunk.stack = nn.ModuleList([Block() for _ in range(4)])
            self.mixed = nn.ModuleList([Block(), nn.Linear(2, 2), Block(), Block(), Block()])

    model = Custom()
    assert find_decoder_layers(model) is model.trunk.stack


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load the model"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "absent")))
