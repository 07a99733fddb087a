"""Training machinery: accumulation invariance, precision, checkpointing, resume, NaN guard, HF export."""


import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lmrefinery.data.collate import collate, rank_micro_batches
from lmrefinery.data.sources import TokenizedExample
from lmrefinery.data.tokenize import ChatEncoder
from lmrefinery.data.formats import Conversation, Message
from lmrefinery.models.loading import enable_activation_checkpointing
from lmrefinery.train.checkpoint_format import checkpoint_steps
from lmrefinery.train.checkpoint_load import full_tensors
from lmrefinery.train.distributed import DistEnv
from lmrefinery.train.losses import accumulate_token_mean_gradients
from lmrefinery.train.run_dir import read_metrics
from tests.helpers import final_weights, losses, resumed_after_kill, run_cli, sft_config, write_yaml
from tests.tiny import QA, tiny_model


def _examples(tokenizer):
    encoder = ChatEncoder(tokenizer)
    examples = []
    for index, (question, answer) in enumerate(QA[:4]):
        encoded = encoder.encode(Conversation((Message("user", question), Message("assistant", answer))), "t")
        examples.append(TokenizedExample(encoded.input_ids, encoded.labels, index % 2))
    return examples


def _gradients(model, micro_batches, precision="fp32", normalize_by="tokens"):
    model.zero_grad(set_to_none=True)
    loss = accumulate_token_mean_gradients(model, micro_batches, DistEnv(), precision, normalize_by=normalize_by).loss
    return loss, {name: p.grad.clone() for name, p in model.named_parameters()}


def _token_losses(model, batch):
    """The model's own per-token cross-entropy over a padded batch: the reference."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch.labels[:, 1:],
                                                 reduction="none", ignore_index=-100)


def test_micro_batch_1x4_equals_4x1(tokenizer):
    examples = _examples(tokenizer)
    pad = tokenizer.pad_token_id
    model = tiny_model("llama", vocab_size=len(tokenizer))
    loss_one, grads_one = _gradients(model, [collate(examples, pad)])
    loss_four, grads_four = _gradients(model, [collate([e], pad) for e in examples])
    assert loss_one == pytest.approx(loss_four, abs=1e-5)
    for name in grads_one:
        torch.testing.assert_close(grads_one[name], grads_four[name], atol=1e-5, rtol=0)
    # Reference: the token-mean loss computed by hand from the model's own per-token cross-entropy.
    batch = collate(examples, pad)
    reference = _token_losses(model, batch).sum() / (batch.labels[:, 1:] != -100).sum()
    assert loss_one == pytest.approx(float(reference), abs=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    examples = _examples(tokenizer)
    batch = [collate(examples, tokenizer.pad_token_id)]
    model = tiny_model("qwen2", vocab_size=len(tokenizer))
    loss_plain, grads_plain = _gradients(model, batch)
    enable_activation_checkpointing(model)
    model.train()
    calls = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    loss_ckpt, grads_ckpt = _gradients(model, batch)
    assert len(calls) == 2  # forward + recomputation in backward: checkpointing is really on
    assert loss_plain == pytest.approx(loss_ckpt, abs=1e-6)
    for name in grads_plain:
        torch.testing.assert_close(grads_plain[name], grads_ckpt[name], atol=1e-6, rtol=0)


def test_bf16_autocast_keeps_fp32_masters_and_close_loss(tokenizer):
    examples = _examples(tokenizer)
    batch = [collate(examples, tokenizer.pad_token_id)]
    model = tiny_model("llama", vocab_size=len(tokenizer))
    loss_fp32, _ = _gradients(model, batch, "fp32")
    loss_bf16, grads = _gradients(model, batch, "bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert loss_bf16 != loss_fp32 and loss_bf16 == pytest.approx(loss_fp32, rel=2e-2)


def test_sft_resume_gives_identical_final_weights(tmp_path, tiny_model_dir):
    run, reference = resumed_after_kill(tmp_path, "sft", sft_config(tmp_path, tiny_model_dir), 3, 6,
                                        ("model", "summary.json"))
    final, expected = final_weights(run, 6), final_weights(reference, 6)
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], atol=1e-6, rtol=0)
    steps = [m["step"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert losses(run) == pytest.approx(losses(reference), abs=1e-6)


def test_without_resume_an_existing_run_is_refused(tmp_path, tiny_model_dir, capsys):
    config = write_yaml(tmp_path / "c.yaml", sft_config(tmp_path, tiny_model_dir, steps=1))
    assert run_cli("sft", "--config", config) == 0
    assert run_cli("sft", "--config", config) == 2
    assert "--resume" in capsys.readouterr().err


def test_micro_batching_does_not_change_the_trajectory(tmp_path, tiny_model_dir):
    base = sft_config(tmp_path, tiny_model_dir, steps=3, checkpoint_every=None)
    trajectories = []
    for micro in (1, 4):
        config = dict(base, output_dir=str(tmp_path / f"micro{micro}"),
                      train=dict(base["train"], micro_batch_size=micro))
        assert run_cli("sft", "--config", write_yaml(tmp_path / f"m{micro}.yaml", config)) == 0
        trajectories.append(losses(tmp_path / f"micro{micro}"))
    assert trajectories[0] == pytest.approx(trajectories[1], abs=1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_model_dir, capsys):
    # An absurd learning rate makes the weights overflow after the first update, so step 2's loss is not finite.
    config = sft_config(tmp_path, tiny_model_dir, lr=1e30, checkpoint_every=1, max_grad_norm=None, warmup_steps=0,
                        schedule="constant")
    assert run_cli("sft", "--config", write_yaml(tmp_path / "nan.yaml", config)) == 3
    run = tmp_path / "run"
    assert checkpoint_steps(run) == [1]
    assert not (run / "model").exists()
    assert "diverged" in capsys.readouterr().err
    assert full_tensors(run / "checkpoints" / "step-1")  # complete and readable


def test_final_model_loads_with_automodel_and_matches_checkpoint(tmp_path, tiny_model_dir):
    config = sft_config(tmp_path, tiny_model_dir, steps=2, checkpoint_every=None)
    assert run_cli("sft", "--config", write_yaml(tmp_path / "c.yaml", config)) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    checkpoint = full_tensors(tmp_path / "run" / "checkpoints" / "step-2")
    state = loaded.state_dict()
    for name, tensor in checkpoint.items():
        torch.testing.assert_close(state[name], tensor, atol=0, rtol=0)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(original[n], state[n]) for n in checkpoint)


def test_without_a_final_checkpoint_a_run_writes_only_its_model_and_the_same_one(tmp_path, tiny_model_dir):
    """`checkpoint_at_end: false` (what compare's stages use): no checkpoint at all, the same trained model."""
    models = {}
    for at_end in (True, False):
        (tmp_path / str(at_end)).mkdir()
        config = sft_config(tmp_path / str(at_end), tiny_model_dir, steps=2, checkpoint_every=None,
                            checkpoint_at_end=at_end)
        assert run_cli("sft", "--config", write_yaml(tmp_path / f"{at_end}.yaml", config)) == 0
        run = tmp_path / str(at_end) / "run"
        assert (run / "checkpoints" / "step-2").exists() == at_end
        assert not at_end or not list((run / "checkpoints").iterdir())[1:]  # only the final one
        models[at_end] = AutoModelForCausalLM.from_pretrained(run / "model").state_dict()
    assert all(torch.equal(models[True][name], tensor) for name, tensor in models[False].items())
    from lmrefinery.compare.stages import train_tree
    from lmrefinery.config import CompareConfig, validate_config
    tree = {"model": {"name_or_path": str(tiny_model_dir)}, "mixture": {"sources": [{"name": "a", "path": "a"}],
            "validation": [{"name": "v", "path": "v"}], "test": [{"name": "t", "path": "t"}]}}
    for every, at_end in ((None, False), (50, True)):
        compare = validate_config(CompareConfig, tree | {"train": {"steps": 100, "checkpoint_every": every}})
        assert train_tree(compare)["checkpoint_at_end"] is at_end


def test_label_smoothed_loss_is_the_mixture_of_cross_entropy_and_uniform_target(tokenizer):
    """(1 − ε)·(−log p_gold) + ε·mean_v(−log p_v) per supervised token, written out by hand."""
    from lmrefinery.train.losses import label_smoothed_loss_sums

    examples = _examples(tokenizer)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    batch = collate(examples, tokenizer.pad_token_id)
    epsilon = 0.2
    sums, tokens = label_smoothed_loss_sums(epsilon)(model, batch, "fp32")
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=batch.input_ids,
                                        attention_mask=batch.attention_mask).logits[:, :-1].double(), dim=-1)
    targets = batch.labels[:, 1:]
    keep = targets != -100
    gold = -log_p.gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
    expected = ((1 - epsilon) * gold + epsilon * -log_p.mean(dim=-1)) * keep
    torch.testing.assert_close(sums.double(), expected.sum(dim=1), atol=1e-4, rtol=0)
    assert torch.equal(tokens, keep.sum(dim=1))
    plain, _ = label_smoothed_loss_sums(0.0)(model, batch, "fp32")
    assert float((sums - plain).detach().abs().min()) > 1e-3  # smoothing changes every example's loss


def test_sequence_sum_normalisation_is_the_mean_per_example_sum_for_any_split(tokenizer):
    """normalize_by='examples' (distill's reduction 'sequence_sum'): the loss is Σ token losses / examples of the
    global batch, whatever the micro-batching."""
    examples = _examples(tokenizer)
    pad = tokenizer.pad_token_id
    model = tiny_model("llama", vocab_size=len(tokenizer))

    loss_one, grads_one = _gradients(model, [collate(examples, pad)], normalize_by="examples")
    loss_four, grads_four = _gradients(model, [collate([e], pad) for e in examples], normalize_by="examples")
    token_losses = _token_losses(model, collate(examples, pad))
    assert loss_one == pytest.approx(float(token_losses.sum()) / len(examples), abs=1e-5)
    assert loss_four == pytest.approx(loss_one, abs=1e-5)
    for name in grads_one:
        torch.testing.assert_close(grads_one[name], grads_four[name], atol=1e-5, rtol=0)


def test_micro_batches_group_examples_of_similar_length_and_keep_each_ranks_share():
    # Lengths designed so that the sampler's order alternates long and short: cut as drawn, every micro-batch of two
    # pads a short example to a long one; grouped by length, equal lengths share micro-batches and nothing pads.
    lengths = np.array([30, 5, 31, 6, 30, 5, 31, 6])
    batch = [0, 1, 2, 3, 4, 5, 6, 7]
    padded = lambda micro: sum(len(m) * max(lengths[m]) - sum(lengths[m]) for m in micro)  # noqa: E731
    as_drawn = rank_micro_batches(batch, 0, 1, 2)
    grouped = rank_micro_batches(batch, 0, 1, 2, lengths)
    assert padded(as_drawn) == 4 * 25
    assert grouped == [[1, 5], [3, 7], [0, 4], [2, 6]]  # stable: equal lengths keep the sampler's order
    assert padded(grouped) == 0
    for rank in (0, 1):  # each rank still gets its strided share, only its order changes
        assert sorted(sum(rank_micro_batches(batch, rank, 2, 2, lengths), [])) == batch[rank::2]
    assert rank_micro_batches(batch, 0, 1, 8, lengths) == [batch]  # one micro-batch: nothing to group


def test_length_grouped_micro_batches_give_the_gradient_of_the_whole_batch(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    examples = _examples(tokenizer)
    lengths = np.array([len(e.input_ids) for e in examples])
    order = list(range(len(examples)))
    whole = [collate(examples, tokenizer.pad_token_id, order)]
    grouped = [collate([examples[i] for i in micro], tokenizer.pad_token_id, micro)
               for micro in rank_micro_batches(order, 0, 1, 2, lengths)]
    assert sum(b.input_ids.numel() for b in grouped) < whole[0].input_ids.numel()  # the designed lengths differ
    loss_whole, gradients_whole = _gradients(model, whole)
    loss_grouped, gradients_grouped = _gradients(model, grouped)
    assert loss_grouped == pytest.approx(loss_whole, abs=1e-6)
    for name, gradient in gradients_whole.items():
        torch.testing.assert_close(gradients_grouped[name], gradient, atol=1e-6, rtol=1e-5)
