"""LISA: only active blocks train, inactive ones stay bit-identical, optimizer state stays bounded, resume is exact."""

import json

import pytest
import torch

from lmrefinery.data.collate import collate
from lmrefinery.data.formats import Conversation, Message
from lmrefinery.data.sources import TokenizedExample
from lmrefinery.data.tokenize import ChatEncoder
from lmrefinery.lisa import LISA
from lmrefinery.models import find_decoder_layers
from lmrefinery.train.distributed import DistEnv
from lmrefinery.train.losses import optimizer_step
from lmrefinery.train.run_dir import read_metrics
from tests.helpers import (final_weights, losses, resumed_after_kill, run_cli, run_one_and_two_processes, sft_config,
                           write_yaml)
from tests.tiny import FAMILIES, QA, tiny_model


def _batch(tokenizer):
    encoder = ChatEncoder(tokenizer)
    examples = [TokenizedExample(*vars(encoder.encode(Conversation((Message("user", q), Message("assistant", a))),
                                                      "t")).values(), 0) for q, a in QA[:4]]
    return [collate(examples, tokenizer.pad_token_id)]


def _snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _check_periods(model, optimizer, lisa, step_fn, periods=4):
    """Run `periods` LISA periods checking the acceptance invariants; return state bytes after each switch."""
    blocks = find_decoder_layers(model)
    outside = [p for p in model.parameters() if all(p is not q for b in blocks for q in b.parameters())]
    state_bytes = []
    for _ in range(periods):
        active = set(lisa.active)
        for index, block in enumerate(blocks):
            assert all(p.requires_grad == (index in active) for p in block.parameters())
        assert all(p.requires_grad for p in outside)
        before = [_snapshot(block) for block in blocks]
        for _ in range(lisa.interval):
            step_fn()
            switched = lisa.step()
        assert switched
        for index, block in enumerate(blocks):
            after = _snapshot(block)
            if index in active:
                assert all(not torch.equal(before[index][n], after[n]) for n in after), f"active block {index}"
            else:
                assert all(torch.equal(before[index][n], after[n]) for n in after), f"inactive block {index}"
        state_bytes.append(lisa.optimizer_state_bytes())
        held = {id(p) for p in optimizer.state}
        for index, block in enumerate(blocks):  # state is freed for every block not trained in the new period
            if index not in lisa.active:
                assert not any(id(p) in held for p in block.parameters())
    return state_bytes


@pytest.mark.parametrize("family", FAMILIES)
def test_lisa_invariants_for_every_family(tokenizer, family):
    model = tiny_model(family, layers=4, vocab_size=len(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    lisa = LISA(model, optimizer, layers=2, interval=2, seed=1)
    batch = _batch(tokenizer)
    _check_periods(model, optimizer, lisa,
                   lambda: optimizer_step(model, optimizer, None, batch, DistEnv(), "fp32", 1.0, 0))


def test_state_bytes_same_after_1_and_10_switches(tokenizer):
    model = tiny_model("llama", layers=6, vocab_size=len(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lisa = LISA(model, optimizer, layers=2, interval=1, seed=0)
    batch = _batch(tokenizer)
    measured = []
    for switch in range(1, 11):
        optimizer_step(model, optimizer, None, batch, DistEnv(), "fp32", None, switch)
        measured.append(lisa.optimizer_state_bytes())  # after the step: state of the trained blocks exists
        lisa.step()
    assert measured[0] == measured[-1] == max(measured)
    blocks = find_decoder_layers(model)
    per_block = sum(p.numel() for p in blocks[0].parameters()) * 4 * 2  # fp32 exp_avg + exp_avg_sq
    outside = sum(p.numel() for p in model.parameters()) - sum(p.numel() for b in blocks for p in b.parameters())
    assert measured[-1] == pytest.approx(2 * per_block + outside * 8, abs=len(optimizer.state) * 4 + 64)

    keeper_model = tiny_model("llama", layers=6, vocab_size=len(tokenizer))
    keeper_optimizer = torch.optim.AdamW(keeper_model.parameters(), lr=1e-3)
    keeper = LISA(keeper_model, keeper_optimizer, layers=2, interval=1, seed=0, keep_state=True)
    for switch in range(10):
        optimizer_step(keeper_model, keeper_optimizer, None, batch, DistEnv(), "fp32", None, switch)
        keeper.step()
    assert keeper.optimizer_state_bytes() > measured[-1]  # without freeing, state grows with every new block


def test_optimizer_must_cover_every_block():
    model = tiny_model("llama", layers=4)
    for parameter in find_decoder_layers(model)[1].parameters():
        parameter.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="not in the optimizer"):
        LISA(model, optimizer)


def test_tied_embeddings_reject_meaningless_head_switch():
    model = tiny_model("qwen2", layers=2)
    with pytest.raises(ValueError, match="ties"):
        LISA(model, torch.optim.AdamW(model.parameters()), layers=1, train_head=False)
    frozen = LISA(model, torch.optim.AdamW(model.parameters()), layers=1, train_head=False, train_embeddings=False)
    assert not model.get_input_embeddings().weight.requires_grad
    assert frozen.trainable_parameters() < sum(p.numel() for p in model.parameters()) // 2


def test_state_dict_restores_active_set_and_draws():
    model = tiny_model("llama", layers=6)
    optimizer = torch.optim.AdamW(model.parameters())
    lisa = LISA(model, optimizer, layers=2, interval=1, seed=3)
    for _ in range(3):
        lisa.step()
    saved = json.loads(json.dumps(lisa.state_dict()))
    future = []
    for _ in range(4):
        lisa.step()
        future.append(lisa.active)
    restored = LISA(model, optimizer, layers=2, interval=1, seed=99, state=saved)
    assert restored.active == saved["active"]
    replay = []
    for _ in range(4):
        restored.step()
        replay.append(restored.active)
    assert replay == future


def _lisa_config(tmp_path, model_dir, **train):
    config = sft_config(tmp_path, model_dir, **train)
    config["lisa"] = {"enabled": True, "layers": 1, "interval": 2}
    return config


@pytest.mark.parametrize("every", [3, 2], ids=["mid-period", "at-a-switch"])
def test_sft_with_lisa_resumes_exactly(tmp_path, tiny_model_dir, every):
    # every 3: killed mid-period (interval 2), the restored period continues with the same blocks; every 2: killed
    # right after a switch, the new blocks must come back without optimizer state
    run, reference = resumed_after_kill(tmp_path, "sft", _lisa_config(tmp_path, tiny_model_dir, checkpoint_every=every),
                                        every, 6, ("model", "summary.json"))
    final, expected = final_weights(run, 6), final_weights(reference, 6)
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], atol=1e-6, rtol=0)
    periods = [m for m in read_metrics(run / "metrics.jsonl") if m.get("event") == "lisa"]
    reference_periods = [m for m in read_metrics(reference / "metrics.jsonl") if m.get("event") == "lisa"]
    assert [p["active_layers"] for p in periods] == [p["active_layers"] for p in reference_periods]
    assert [p["step"] for p in periods] == [1, 3, 5]
    assert len({p["optimizer_state_bytes"] for p in periods}) == 1


def test_sft_with_lisa_two_processes_match_one(tmp_path, tiny_model_dir):
    config = _lisa_config(tmp_path, tiny_model_dir, steps=4, checkpoint_every=None, micro_batch_size=1)
    single, double = run_one_and_two_processes(tmp_path, "sft", config)
    assert losses(double) == pytest.approx(losses(single), abs=1e-5)
    one, two = final_weights(single, 4), final_weights(double, 4)
    for name in one:  # Adam divides by sqrt(v): float summation-order noise in gradients grows a little in weights
        torch.testing.assert_close(two[name], one[name], atol=1e-4, rtol=0)
    frozen_blocks = {0, 1} - {m["active_layers"][0] for m in read_metrics(single / "metrics.jsonl")
                              if m.get("event") == "lisa"}
    for block in frozen_blocks:  # a block never activated is bit-identical to the initial model in both runs
        for name in one:
            if name.startswith(f"model.layers.{block}."):
                assert torch.equal(one[name], two[name])


def test_lisa_with_bf16_autocast_and_activation_checkpointing(tokenizer):
    from lmrefinery.models.loading import enable_activation_checkpointing

    model = tiny_model("llama", layers=4, vocab_size=len(tokenizer))
    enable_activation_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lisa = LISA(model, optimizer, layers=1, interval=2, seed=4)
    batch = _batch(tokenizer)
    state_bytes = _check_periods(model, optimizer, lisa,
                                 lambda: optimizer_step(model, optimizer, None, batch, DistEnv(), "bf16", 1.0, 0))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(set(state_bytes)) == 1


@pytest.mark.slow
def test_sft_with_lisa_and_compiled_blocks_matches_eager_in_one_and_two_processes(tmp_path, tiny_model_dir):
    """`model.compile: true` under LISA (blocks frozen and thawed: one graph per pattern) and under FSDP2 (per-block
    hooks around the compiled blocks): the losses and weights of the eager run, in one process and in two."""
    eager_config = _lisa_config(tmp_path, tiny_model_dir, steps=4, checkpoint_every=None, micro_batch_size=1)
    eager = tmp_path / "eager"
    eager_yaml = write_yaml(tmp_path / "eager.yaml", dict(eager_config, output_dir=str(eager)))
    assert run_cli("sft", "--config", eager_yaml) == 0
    config = dict(eager_config, model={**eager_config["model"], "compile": True})
    single, double = run_one_and_two_processes(tmp_path, "sft", config)
    for run in (single, double):
        assert losses(run) == pytest.approx(losses(eager), abs=1e-5)
        final, expected = final_weights(run, 4), final_weights(eager, 4)
        for name in expected:
            torch.testing.assert_close(final[name], expected[name], atol=1e-4, rtol=0)
