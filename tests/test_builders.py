"""Data builders: deterministic for a seed, answers accepted by reasoning-gym's scorer, exact corruption rates."""

import pytest

from lmrefinery.data.builders import corrupt_answers, reasoning_gym_records, score_answer

pytest.importorskip("reasoning_gym")


@pytest.mark.parametrize("task", ["basic_arithmetic", "leg_counting", "syllogism"])
def test_records_are_deterministic_and_scored_correct(task):
    records = reasoning_gym_records(task, 6, seed=3)
    assert records == reasoning_gym_records(task, 6, seed=3)
    assert records != reasoning_gym_records(task, 6, seed=4)
    for record in records:
        answer = record["messages"][-1]["content"]
        assert score_answer(task, 3, 6, record["index"], answer) == 1.0


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.6, 1.0])
def test_corruption_rate_is_exact(rate):
    records = reasoning_gym_records("chain_sum", 20, seed=0)
    corrupted = corrupt_answers(records, rate, seed=1)
    changed = [c for c, r in zip(corrupted, records) if c["messages"][-1]["content"] != r["messages"][-1]["content"]]
    assert len(changed) == round(rate * 20)
    assert all(score_answer("chain_sum", 0, 20, c["index"], c["messages"][-1]["content"]) == 0.0 for c in changed)
    assert corrupt_answers(records, rate, seed=1) == corrupted
    assert records == reasoning_gym_records("chain_sum", 20, seed=0)  # the input is not modified
