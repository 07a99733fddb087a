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


@pytest.mark.parametrize("family", FAMILIES)
def test_head_at_supervised_positions_equals_the_full_logits_path(family, tokenizer):
    """response_logits applies the LM head only where the next token is supervised; the losses and every parameter
    gradient must equal those of the full [B, T, V] logits (Gemma-2's soft-capping included)."""
    import torch
    import torch.nn.functional as F

    from lmrefinery.data.collate import collate
    from lmrefinery.data.formats import Conversation, Message
    from lmrefinery.data.sources import TokenizedExample
    from lmrefinery.data.tokenize import ChatEncoder
    from lmrefinery.train.losses import cross_entropy_sums, response_logits
    from tests.tiny import QA

    encoder = ChatEncoder(tokenizer)
    examples = [TokenizedExample(*vars(encoder.encode(Conversation((Message("user", q), Message("assistant", a))),
                                                      "t")).values(), 0) for q, a in QA[:3]]
    batch = collate(examples, tokenizer.pad_token_id)
    model = tiny_model(family, vocab_size=len(tokenizer)).eval()  # no dropout: both paths see the same network

    def gradients(loss_fn):
        model.zero_grad(set_to_none=True)
        sums = loss_fn()
        sums.sum().backward()
        return sums.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    ours = gradients(lambda: cross_entropy_sums(response_logits(model, batch, "fp32"))[0])

    def full():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch.labels[:, 1:], ignore_index=-100,
                                 reduction="none")
        return losses.sum(dim=1)

    reference = gradients(full)
    torch.testing.assert_close(ours[0], reference[0], atol=1e-5, rtol=1e-6)
    assert ours[1].keys() == reference[1].keys()
    for name in ours[1]:
        torch.testing.assert_close(ours[1][name], reference[1][name], atol=1e-6, rtol=1e-5)


def test_a_bfloat16_load_is_for_inference_only(tmp_path, tiny_model_dir, capsys):
    import json

    import torch

    from tests.helpers import run_cli, sft_config, write_yaml
    from tests.tiny import messages_records, write_jsonl

    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir), load_dtype="bfloat16"), training=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(UserError, match="keeps fp32 master weights"):
        load_model(ModelConfig(name_or_path=str(tiny_model_dir), load_dtype="bfloat16"))
    tree = sft_config(tmp_path, tiny_model_dir, steps=1)
    tree["model"]["load_dtype"] = "bfloat16"
    assert run_cli("sft", "--config", write_yaml(tmp_path / "c.yaml", tree)) == 2
    assert "model.load_dtype=bfloat16" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "q.jsonl", messages_records(0, 4))
    for dtype in ("float32", "bfloat16"):
        evaluate = {"output_dir": str(tmp_path / dtype), "batch_size": 4,
                    "model": {"name_or_path": str(tiny_model_dir), "load_dtype": dtype},
                    "data": {"sources": [{"name": "q", "path": str(data)}]}}
        assert run_cli("evaluate", "--config", write_yaml(tmp_path / f"{dtype}.yaml", evaluate)) == 0
    losses = [json.loads((tmp_path / d / "eval.json").read_text())["overall"]["loss"] for d in ("float32", "bfloat16")]
    assert losses[1] == pytest.approx(losses[0], rel=2e-2) and losses[1] != losses[0]


def test_keep_layers_in_place_builds_the_student_without_a_second_model():
    from lmrefinery.distill.student import keep_layers

    teacher = tiny_model("llama", layers=4)
    kept = [p.data_ptr() for p in find_decoder_layers(teacher)[2].parameters()]
    student = keep_layers(teacher, [0, 2], in_place=True)
    assert student is teacher and len(find_decoder_layers(student)) == 2
    assert [p.data_ptr() for p in find_decoder_layers(student)[1].parameters()] == kept  # the same memory


def test_auto_attention_is_eager_only_for_training_on_short_rows_on_cpu(tiny_model_dir):
    from lmrefinery.models.loading import EAGER_ATTENTION_MAX_TOKENS_CPU as SHORT

    config = ModelConfig(name_or_path=str(tiny_model_dir))
    assert config.attn_implementation == "auto"

    def kernel(model_config, **kwargs):
        return load_model(model_config, **kwargs).config._attn_implementation

    assert kernel(config, max_length=SHORT) == "eager"
    assert kernel(config, max_length=SHORT + 1) == "sdpa"
    assert kernel(config) == "sdpa"  # the rows' length unknown
    assert kernel(config, training=False, max_length=64) == "sdpa"
    assert kernel(config.model_copy(update={"attn_implementation": "sdpa"}), max_length=64) == "sdpa"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_eager_and_sdpa_attention_give_the_same_losses_and_gradients_on_padded_rows(family, tokenizer):
    """`attn_implementation: auto` switches kernel by device and row length; that must not change what is learned."""
    import torch

    from lmrefinery.data.collate import collate
    from lmrefinery.data.formats import Conversation, Message
    from lmrefinery.data.sources import TokenizedExample
    from lmrefinery.data.tokenize import ChatEncoder
    from lmrefinery.train.losses import example_loss_sums
    from tests.tiny import QA

    encoder = ChatEncoder(tokenizer)
    examples = [TokenizedExample(*vars(encoder.encode(Conversation((Message("user", q * (1 + i)),
                                                                     Message("assistant", a))), "t")).values(), 0)
                for i, (q, a) in enumerate(QA[:3])]
    batch = collate(examples, tokenizer.pad_token_id)
    assert not bool(batch.attention_mask.all())  # rows of different lengths: padding the kernels must mask alike
    results = []
    for kernel in ("eager", "sdpa"):
        model = tiny_model(family, vocab_size=len(tokenizer)).eval()
        model.set_attn_implementation(kernel)
        sums = example_loss_sums(model, batch, "fp32")[0]
        sums.sum().backward()
        results.append((sums.detach(), {name: p.grad for name, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for name, gradient in results[0][1].items():
        torch.testing.assert_close(gradient, results[1][1][name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compiled_blocks_give_the_eager_losses_and_gradients_over_changing_shapes(family, tokenizer, tmp_path):
    """`model.compile: true` compiles each decoder block in place: the same losses and gradients as eager on padded
    batches of two different lengths, the same parameter names (checkpoints and saved models are unchanged), and the
    blocks really ran compiled (dynamo's frame counter moves)."""
    import torch
    from torch._dynamo.utils import counters

    from lmrefinery.data.collate import collate
    from lmrefinery.data.formats import Conversation, Message
    from lmrefinery.data.sources import TokenizedExample
    from lmrefinery.data.tokenize import ChatEncoder
    from lmrefinery.train.losses import example_loss_sums
    from tests.tiny import QA, save_tiny_model

    encoder = ChatEncoder(tokenizer)

    def batch(repeat: int):
        examples = [TokenizedExample(*vars(encoder.encode(Conversation((Message("user", q * (repeat + i)),
                                                                         Message("assistant", a))), "t")).values(), 0)
                    for i, (q, a) in enumerate(QA[:3])]
        return collate(examples, tokenizer.pad_token_id)

    batches = [batch(1), batch(3)]
    assert batches[0].input_ids.shape[1] != batches[1].input_ids.shape[1]
    directory = save_tiny_model(tmp_path / family, family)
    torch._dynamo.reset()
    counters.clear()
    results = []
    for compiled in (False, True):
        model = load_model(ModelConfig(name_or_path=str(directory), compile=compiled, attn_implementation="eager"))
        model.eval()  # dropout off; gradients still flow
        sums = [example_loss_sums(model, b, "fp32")[0] for b in batches]
        torch.cat(sums).sum().backward()
        results.append((torch.cat(sums).detach(), {name: p.grad for name, p in model.named_parameters()}))
        if compiled:
            assert counters["stats"]["unique_graphs"] > 0  # the blocks did run through dynamo
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    assert results[0][1].keys() == results[1][1].keys()
    for name, gradient in results[0][1].items():
        torch.testing.assert_close(gradient, results[1][1][name], atol=1e-5, rtol=1e-4)
