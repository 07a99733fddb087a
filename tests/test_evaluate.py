"""`evaluate --task loss` equals the token-mean loss computed directly with the model, overall and per source."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmrefinery.config import DataConfig, SourceConfig
from lmrefinery.data.sources import load_pool
from lmrefinery.data.tokenize import ChatEncoder
from tests.helpers import run_cli, run_torchrun, write_yaml
from tests.tiny import messages_records, write_jsonl


def _config(tmp_path, model_dir, name="eval"):
    a = write_jsonl(tmp_path / "a.jsonl", messages_records(0, 7))
    b = write_jsonl(tmp_path / "b.jsonl", messages_records(3, 4))
    return write_yaml(tmp_path / f"{name}.yaml", {
        "output_dir": str(tmp_path / name), "model": {"name_or_path": str(model_dir)}, "batch_size": 3,
        "data": {"sources": [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}], "max_length": 96}})


def _reference(tmp_path, model_dir, tokenizer):
    """Per-source token-mean loss from HF's own loss (mean over each example's tokens) weighted by token counts."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    data = DataConfig(sources=[SourceConfig(name="a", path=str(tmp_path / "a.jsonl")),
                               SourceConfig(name="b", path=str(tmp_path / "b.jsonl"))], max_length=96)
    pool = load_pool(data.sources, ChatEncoder(tokenizer), data)
    sums, counts = [0.0, 0.0], [0, 0]
    with torch.no_grad():
        for example in pool.examples:
            ids = torch.tensor([example.input_ids])
            loss = model(input_ids=ids, labels=torch.tensor([example.labels])).loss
            tokens = sum(1 for label in example.labels[1:] if label != -100)
            sums[example.source_id] += float(loss) * tokens
            counts[example.source_id] += tokens
    return {"a": sums[0] / counts[0], "b": sums[1] / counts[1], "all": sum(sums) / sum(counts)}


def test_loss_matches_direct_computation(tmp_path, tiny_model_dir, tokenizer):
    assert run_cli("evaluate", "--task", "loss", "--config", _config(tmp_path, tiny_model_dir)) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    expected = _reference(tmp_path, tiny_model_dir, tokenizer)
    assert result["sources"] == ["a", "b"]
    assert result["per_source"]["a"]["loss"] == pytest.approx(expected["a"], abs=1e-5)
    assert result["per_source"]["b"]["loss"] == pytest.approx(expected["b"], abs=1e-5)
    assert result["overall"]["loss"] == pytest.approx(expected["all"], abs=1e-5)
    assert result["overall"]["perplexity"] == pytest.approx(math.exp(expected["all"]), rel=1e-5)
    assert result["per_source"]["a"]["examples"] == 7 and result["per_source"]["b"]["examples"] == 4


def test_two_process_evaluation_matches(tmp_path, tiny_model_dir):
    assert run_cli("evaluate", "--config", _config(tmp_path, tiny_model_dir, "one")) == 0
    result = run_torchrun(2, "evaluate", "--config", _config(tmp_path, tiny_model_dir, "two"))
    assert result.returncode == 0, result.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "eval.json").read_text())
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    for name in ("a", "b"):
        assert two["per_source"][name]["loss"] == pytest.approx(one["per_source"][name]["loss"], abs=1e-5)
        assert two["per_source"][name]["tokens"] == one["per_source"][name]["tokens"]
    for key in ("token_accuracy", "token_ece", "token_brier"):
        assert two["overall"][key] == pytest.approx(one["overall"][key], abs=1e-6)


def test_loss_task_reports_next_token_calibration(tmp_path, tiny_model_dir, tokenizer):
    """token_accuracy / token_ece / token_brier equal the calibration module's formulas applied to every supervised
    token's full next-token distribution, computed one unpadded example at a time."""
    from lmrefinery.evaluation.calibration import brier_score, expected_calibration_error

    assert run_cli("evaluate", "--task", "loss", "--config", _config(tmp_path, tiny_model_dir), "n_bins=7") == 0
    overall = json.loads((tmp_path / "eval" / "eval.json").read_text())["overall"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    data = DataConfig(sources=[SourceConfig(name="a", path=str(tmp_path / "a.jsonl")),
                               SourceConfig(name="b", path=str(tmp_path / "b.jsonl"))], max_length=96)
    probabilities, gold = [], []
    with torch.no_grad():
        for example in load_pool(data.sources, ChatEncoder(tokenizer), data).examples:
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
            targets = torch.tensor(example.labels[1:])
            keep = targets != -100
            probabilities.append(torch.softmax(logits[keep].double(), dim=-1))
            gold.append(targets[keep])
    probabilities, gold = torch.cat(probabilities), torch.cat(gold)
    confidence, predicted = probabilities.max(dim=-1)
    correct = (predicted == gold).double()
    assert overall["token_accuracy"] == pytest.approx(float(correct.mean()), abs=1e-9)
    assert overall["token_ece"] == pytest.approx(expected_calibration_error(confidence, correct, 7), abs=1e-5)
    assert overall["token_brier"] == pytest.approx(brier_score(probabilities, gold), abs=1e-5)
    assert 0 < overall["token_ece"] and 0 < overall["token_brier"] < 2
