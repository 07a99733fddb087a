"""Packed rows (data/packing.py) compute exactly what the padded batch computes: per-example losses and gradients,
validation losses, the teacher cache's bytes, across world sizes; and a model that ignores packed rows is refused."""

import pytest
import torch

from lmrefinery.data.collate import collate
from lmrefinery.data.packing import best_fit_rows
from lmrefinery.data.token_columns import TokenizedExample
from lmrefinery.data.tokenize import IGNORE_INDEX
from lmrefinery.errors import UserError
from lmrefinery.train.losses import example_loss_sums
from lmrefinery.train.packing_check import check_packing_exact
from tests.first_helpers import make_cache
from tests.helpers import losses, read_metrics, run_cli, run_one_and_two_processes, sft_config, write_yaml
from tests.tiny import QA, messages_records, tiny_model, write_jsonl


def test_best_fit_decreasing_on_designed_lengths():
    # capacity 10 (the longest): 10 alone; 7 + 3; 6 + 4; 5 + 5 → 4 full rows instead of 7
    lengths = [5, 10, 3, 7, 6, 4, 5]
    rows = best_fit_rows(lengths, max(lengths))
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert rows == [[1], [3, 2], [4, 5], [0, 6]]
    # a 1 more fits nowhere (the rows are full): a fifth row
    assert best_fit_rows(lengths + [1], 10) == rows + [[7]]


def _examples(tokenizer, count=7):
    """Question + answer token ids of varied lengths, the answer supervised."""
    examples = []
    for index in range(count):
        question, answer = QA[index % len(QA)]
        prompt = tokenizer(question * (1 + index % 3))["input_ids"]
        reply = tokenizer(" " + answer)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(TokenizedExample(prompt + reply, [IGNORE_INDEX] * len(prompt) + reply, index % 2))
    return examples


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_losses_and_gradients_equal_the_padded_batch(tokenizer, family):
    model = tiny_model(family, vocab_size=len(tokenizer))
    examples = _examples(tokenizer)
    padded = collate(examples, tokenizer.pad_token_id)
    packed = collate(examples, tokenizer.pad_token_id, pack_rows=True)
    assert packed.packed.input_ids.shape[0] < len(examples)  # the designed lengths do pack
    assert packed.padded_tokens < padded.padded_tokens

    def sums_and_grads(batch):
        model.zero_grad(set_to_none=True)
        sums, counts = example_loss_sums(model, batch, "fp32")
        sums.sum().backward()
        return sums.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}

    sums_padded, counts_padded, grads_padded = sums_and_grads(padded)
    sums_packed, counts_packed, grads_packed = sums_and_grads(packed)
    assert torch.equal(counts_packed, counts_padded)
    torch.testing.assert_close(sums_packed, sums_padded, atol=1e-5, rtol=0)
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=1e-5, rtol=1e-5)
    check_packing_exact(model, packed)  # the run-time check agrees


def test_a_model_that_attends_across_packed_examples_is_refused(tokenizer, monkeypatch):
    import transformers.masking_utils as masking

    model = tiny_model("llama", vocab_size=len(tokenizer))
    packed = collate(_examples(tokenizer), tokenizer.pad_token_id, pack_rows=True)
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)  # plain causal rows
    with pytest.raises(UserError, match="does not keep attention within each example"):
        check_packing_exact(model, packed)


def test_sft_with_packing_trains_and_validates_as_without(tmp_path, tiny_model_dir):
    runs = {}
    for packing in (False, True):
        config = sft_config(tmp_path, tiny_model_dir, steps=4, checkpoint_every=None, micro_batch_size=4,
                            packing=packing)
        config["data"]["sources"][0]["path"] = str(write_jsonl(tmp_path / "skewed.jsonl", _skewed_records()))
        config["data"]["max_length"] = 192
        config["output_dir"] = str(tmp_path / f"packing-{packing}")
        config["validation"] = {"sources": config["data"]["sources"], "every": 4, "batch_size": 5}
        assert run_cli("sft", "--config", write_yaml(tmp_path / f"{packing}.yaml", config)) == 0
        runs[packing] = tmp_path / f"packing-{packing}"
    assert losses(runs[True]) == pytest.approx(losses(runs[False]), abs=1e-5)
    validation = {p: [m["val_loss"] for m in read_metrics(r / "metrics.jsonl") if "val_loss" in m]
                  for p, r in runs.items()}
    assert len(validation[True]) == 1 and validation[True] == pytest.approx(validation[False], abs=1e-5)
    padded = {p: sum(m["padded_tokens"] for m in read_metrics(r / "metrics.jsonl") if "padded_tokens" in m)
              for p, r in runs.items()}
    assert padded[True] < padded[False]


def _skewed_records():
    """Every other reply twelve times as long: two short examples then fit in the row of a long one's length."""
    records = messages_records(0, 12)
    for index, record in enumerate(records):
        if index % 2 == 0:
            record["messages"][1]["content"] = " ".join([record["messages"][1]["content"]] * 12)
    return records


def test_teacher_cache_written_packed_is_byte_identical(tmp_path, tiny_model_dir):
    skewed = str(write_jsonl(tmp_path / "skewed.jsonl", _skewed_records()))
    data = {"sources": [{"name": "a", "path": skewed}], "max_length": 192}
    plain = make_cache(tmp_path, tiny_model_dir, "plain", data=data, batch_size=4)
    packed = make_cache(tmp_path, tiny_model_dir, "packed", data=data, batch_size=4, packing=True)
    shards = sorted(p.name for p in plain.glob("shard-*"))
    assert shards and shards == sorted(p.name for p in packed.glob("shard-*"))
    for name in shards:
        assert (packed / name).read_bytes() == (plain / name).read_bytes(), name


@pytest.mark.slow
def test_two_processes_match_one_with_packing(tmp_path, tiny_model_dir):
    config = sft_config(tmp_path, tiny_model_dir, steps=2, checkpoint_every=None, batch_size=8, micro_batch_size=4,
                        packing=True)
    config["data"]["sources"][0]["path"] = str(write_jsonl(tmp_path / "skewed.jsonl", _skewed_records()))
    config["data"]["max_length"] = 192
    single, double = run_one_and_two_processes(tmp_path, "sft", config)
    assert losses(double) == pytest.approx(losses(single), abs=1e-5)
    padded = dict(config, output_dir=str(tmp_path / "padded"), train=dict(config["train"], packing=False))
    assert run_cli("sft", "--config", write_yaml(tmp_path / "padded.yaml", padded)) == 0
    assert losses(tmp_path / "padded") == pytest.approx(losses(single), abs=1e-5)

    def padding(run):
        return sum(m.get("padded_tokens", 0) for m in read_metrics(run / "metrics.jsonl"))
    # rows were packed (each rank packs its own strided share, so the two layouts pack differently)
    assert padding(single) < padding(tmp_path / "padded") and padding(double) < padding(tmp_path / "padded")


@pytest.mark.parametrize("mode", ["cache", "online"])
def test_distill_with_packing_gives_the_padded_losses(tmp_path, tiny_model_dir, mode):
    """The student reads its cache rows (or the live teacher's logits) in example order whatever the row layout."""
    skewed = str(write_jsonl(tmp_path / "skewed.jsonl", _skewed_records()))
    cache = make_cache(tmp_path, tiny_model_dir, data={"sources": [{"name": "a", "path": skewed}],
                                                       "max_length": 192})
    runs = {}
    for packing in (False, True):
        config = {"output_dir": str(tmp_path / f"student-{packing}"), "cache": str(cache),
                  "student": {"init": "keep-layers", "keep_layers": [1]},
                  "loss": {"mode": mode, "teacher_transform": "prob_temperature", "temperature": 0.5},
                  "train": {"steps": 2, "batch_size": 6, "micro_batch_size": 6, "lr": 1e-3, "warmup_steps": 0,
                            "packing": packing}}
        assert run_cli("distill", "--config", write_yaml(tmp_path / f"d-{packing}.yaml", config)) == 0
        runs[packing] = read_metrics(tmp_path / f"student-{packing}" / "metrics.jsonl")
    assert [m["loss"] for m in runs[True] if "loss" in m] == pytest.approx(
        [m["loss"] for m in runs[False] if "loss" in m], abs=1e-5)
    assert sum(m.get("padded_tokens", 0) for m in runs[True]) < sum(m.get("padded_tokens", 0) for m in runs[False])
