"""LESS-style and RHO-style scores against exact references on a tiny model; keeping the top examples."""

import random

import pytest
import torch
import torch.nn.functional as F

from lmrefinery.config import DataConfig, ModelConfig, SourceConfig
from lmrefinery.data.tokenize import IGNORE_INDEX
from lmrefinery.models import load_model
from lmrefinery.recipes.common import load_data
from lmrefinery.baselines.less import CountSketch, cosine_to_mean, gradient_features, last_block_parameters
from lmrefinery.baselines.mixture import rank_by_score
from lmrefinery.baselines.rho import example_losses
from tests.tiny import save_tiny_model, write_jsonl


def _arithmetic(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        a, b = rng.randrange(100), rng.randrange(100)
        if rng.random() < 0.5:
            question, answer = f"What is {a} plus {b}?", str(a + b)
        else:
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randrange(3, 9)))
            question, answer = f"Reverse {word}", word[::-1]
        records.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return records


def _pools(tmp_path, model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", _arithmetic(24, 0))
    validation = write_jsonl(tmp_path / "validation.jsonl", _arithmetic(6, 1))
    data = DataConfig(sources=[SourceConfig(name="train", path=str(train))], max_length=128)
    tokenizer, pool, extras = load_data(ModelConfig(name_or_path=str(model_dir)), data,
                                        {"validation": [SourceConfig(name="validation", path=str(validation))]})
    return tokenizer, pool, extras["validation"]


def _exact_gradient(model, example, parameters) -> torch.Tensor:
    """Full backward of one unpadded example's token-mean loss; read .grad of the chosen parameters."""
    model.zero_grad(set_to_none=True)
    input_ids = torch.tensor([example.input_ids])
    labels = torch.tensor(example.labels[1:])
    logits = model(input_ids=input_ids).logits[0, :-1]
    F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX).backward()
    return torch.cat([p.grad.reshape(-1) for p in parameters]).double()


def _ranks(values: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[torch.argsort(values)] = torch.arange(len(values), dtype=torch.float64)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a) - (len(a) - 1) / 2, _ranks(b) - (len(b) - 1) / 2
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def test_less_scores_rank_examples_like_exact_gradient_cosines(tmp_path, tiny_model_dir):
    tokenizer, pool, validation = _pools(tmp_path, tiny_model_dir)
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    parameters = last_block_parameters(model, 1)
    sketch = CountSketch([p.numel() for p in parameters], 2048, seed=0)
    features = gradient_features(model, pool, sketch, parameters, "fp32", tokenizer.pad_token_id)
    validation_features = gradient_features(model, validation, sketch, parameters, "fp32", tokenizer.pad_token_id)
    scores = cosine_to_mean(features, validation_features)

    exact = torch.stack([_exact_gradient(model, e, parameters) for e in pool.examples])
    exact_validation = torch.stack([_exact_gradient(model, e, parameters) for e in validation.examples])
    reference = cosine_to_mean(exact, exact_validation)
    assert sum(p.numel() for p in parameters) > 4 * 2048  # a real compression, not an identity
    assert reference.std() > 0.05  # designed data: the examples differ in how well they align with validation
    assert spearman(scores, reference) >= 0.9
    # The sketch is seeded: the same seed gives the same features.
    again = gradient_features(model, pool, CountSketch([p.numel() for p in parameters], 2048, seed=0), parameters,
                              "fp32", tokenizer.pad_token_id)
    assert torch.equal(features, again)
    assert all(p.requires_grad for p in model.parameters())  # the scorer restores what it switched off


def test_count_sketch_preserves_inner_products_in_expectation():
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(5000, generator=generator), torch.randn(5000, generator=generator)
    y = 0.6 * x + 0.8 * y
    estimates = [float(CountSketch([5000], 256, seed).project([x]) @ CountSketch([5000], 256, seed).project([y]))
                 for seed in range(200)]
    exact = float(x @ y)
    # mean of 200 independent sketches: standard error ≈ √(2/256)·|x||y|/√200 ≈ 0.006·5000
    assert sum(estimates) / len(estimates) == pytest.approx(exact, abs=0.03 * 5000)


def test_rho_scores_are_exactly_the_loss_differences(tmp_path, tiny_model_dir):
    tokenizer, pool, _ = _pools(tmp_path, tiny_model_dir)
    current = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    reference = load_model(ModelConfig(name_or_path=str(save_tiny_model(tmp_path / "reference", seed=5))))
    scores = (example_losses(current, pool, 5, "fp32", tokenizer.pad_token_id)
              - example_losses(reference, pool, 5, "fp32", tokenizer.pad_token_id))

    def loss(model, example):  # one unpadded example at a time: no batching, no padding
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
        return float(F.cross_entropy(logits, torch.tensor(example.labels[1:]), ignore_index=IGNORE_INDEX))

    expected = torch.tensor([loss(current, e) - loss(reference, e) for e in pool.examples], dtype=torch.float64)
    assert torch.allclose(scores, expected, atol=2e-5, rtol=0)
    assert expected.std() > 0.05  # the two models really differ, and by different amounts per example


def test_ranking_keeps_the_highest_scores_first_with_ties_to_the_lower_index():
    scores = torch.tensor([0.1, 0.9, 0.2, 0.9, 0.5])
    assert rank_by_score(scores) == [1, 3, 4, 2, 0]
