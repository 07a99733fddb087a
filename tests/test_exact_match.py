"""exact-match evaluation: reasoning-gym scoring from record metadata, and batched = one-by-one generation."""

import json

import pytest
from transformers import AutoModelForCausalLM

from lmrefinery.data.builders import reasoning_gym_records, write_jsonl
from lmrefinery.data.tokenize import ChatEncoder
from lmrefinery.evaluation.exact_match import generate_answers, load_prompts, score
from tests.helpers import run_cli, write_yaml
from tests.tiny import messages_records


def test_scoring_uses_reasoning_gym_metadata_or_exact_strings(tmp_path):
    pytest.importorskip("reasoning_gym")
    path = write_jsonl(tmp_path / "rg.jsonl", reasoning_gym_records("basic_arithmetic", 4, seed=5))
    items = load_prompts(str(path))
    assert all(score(item, item["reference"]) == 1.0 for item in items)
    assert all(score(item, "not a number") == 0.0 for item in items)
    plain = load_prompts(str(write_jsonl(tmp_path / "plain.jsonl", messages_records(0, 2))))
    assert score(plain[0], f"  {plain[0]['reference']} ") == 1.0 and score(plain[0], "other") == 0.0


def test_batched_generation_equals_one_by_one(tmp_path, tiny_model_dir, tokenizer):
    items = load_prompts(str(write_jsonl(tmp_path / "q.jsonl", messages_records(0, 5))))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    encoder = ChatEncoder(tokenizer)
    batched = generate_answers(model, encoder, items, 5, 6, "cpu")
    single = [generate_answers(model, encoder, [item], 1, 6, "cpu")[0] for item in items]
    assert batched == single and len(set(len(i["messages"][0]["content"]) for i in items)) > 1


def test_evaluate_exact_match_command(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "q.jsonl", messages_records(0, 3))
    config = {"output_dir": str(tmp_path / "em"), "task": "exact_match", "max_new_tokens": 4,
              "model": {"name_or_path": str(tiny_model_dir)}, "data": {"sources": [{"name": "q", "path": str(path)}]}}
    assert run_cli("evaluate", "--config", write_yaml(tmp_path / "e.yaml", config)) == 0
    report = json.loads((tmp_path / "em" / "eval.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "em" / "items.jsonl").read_text().splitlines()]
    assert report["overall"]["items"] == 3 == len(rows)
    assert report["overall"]["accuracy"] == sum(r["score"] == 1.0 for r in rows) / 3
