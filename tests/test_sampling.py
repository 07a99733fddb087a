"""Mixture sampling: deterministic for a seed, faithful to its probabilities, resumable from its state."""

import json
from collections import Counter

import pytest

from lmrefinery.config import SamplingConfig
from lmrefinery.data.sampling import MixtureSampler, source_probabilities
from lmrefinery.errors import UserError

SOURCES = [list(range(0, 30)), list(range(30, 40)), list(range(40, 100))]
NAMES = ["a", "b", "c"]


def _sampler(strategy, weights=None, seed=0, batch=8):
    return MixtureSampler.build(SamplingConfig(strategy=strategy, weights=weights), NAMES, SOURCES, batch, seed)


def _source_of(index):
    return next(s for s, items in enumerate(SOURCES) if index in items)


def test_proportional_visits_every_example_once_per_pass():
    sampler = _sampler("proportional", batch=10)
    first_pass = [i for _ in range(10) for i in sampler.next_batch()]
    assert sorted(first_pass) == list(range(100))


@pytest.mark.parametrize("strategy, weights, expected", [
    ("uniform", None, [1 / 3, 1 / 3, 1 / 3]),
    ("weights", {"a": 0.7, "b": 0.2, "c": 0.1}, [0.7, 0.2, 0.1]),
])
def test_weighted_frequencies_follow_probabilities(strategy, weights, expected):
    sampler = _sampler(strategy, weights, batch=100)
    counts = Counter(_source_of(i) for _ in range(60) for i in sampler.next_batch())
    for source, p in enumerate(expected):
        assert counts[source] / 6000 == pytest.approx(p, abs=0.02)


def test_within_a_source_no_repeats_before_it_is_exhausted():
    sampler = _sampler("weights", {"a": 0, "b": 1, "c": 0}, batch=5)
    drawn = sampler.next_batch() + sampler.next_batch()
    assert sorted(drawn) == SOURCES[1]


@pytest.mark.parametrize("strategy", ["proportional", "uniform"])
def test_state_dict_resumes_the_same_stream(strategy):
    uninterrupted = _sampler(strategy)
    expected = [uninterrupted.next_batch() for _ in range(12)]
    first = _sampler(strategy)
    head = [first.next_batch() for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (it lives in state.json)
    second = _sampler(strategy)
    second.load_state_dict(state)
    assert head + [second.next_batch() for _ in range(7)] == expected


def test_seed_changes_the_stream_and_is_deterministic():
    assert _sampler("uniform", seed=1).next_batch() == _sampler("uniform", seed=1).next_batch()
    assert _sampler("uniform", seed=1).next_batch() != _sampler("uniform", seed=2).next_batch()


def test_weights_file_and_name_checks(tmp_path):
    path = tmp_path / "weights.json"
    path.write_text(json.dumps({"weights": {"a": 2, "b": 1, "c": 1}, "steps": 10}))
    assert source_probabilities(SamplingConfig(strategy="weights", weights=str(path)), NAMES, [1, 1, 1]) == [
        0.5, 0.25, 0.25]
    with pytest.raises(UserError, match="missing \\['c'\\]"):
        source_probabilities(SamplingConfig(strategy="weights", weights={"a": 1, "b": 1}), NAMES, [1, 1, 1])


def test_a_draw_costs_no_new_permutation_of_a_large_pool(monkeypatch):
    """1,000,000 pooled examples, 20 batches of 128: one shuffled pass is computed (O(pool) once per epoch), not one
    per draw — which the earlier sampler did, 2,560 times here. The draws are those of the per-pass permutation."""
    from lmrefinery.data import sampling

    calls = []
    original = sampling._permutation
    monkeypatch.setattr(sampling, "_permutation", lambda *a: calls.append(a) or original(*a))
    sources = [list(range(0, 400_000)), list(range(400_000, 1_000_000))]
    sampler = MixtureSampler.build(SamplingConfig(strategy="proportional"), ["a", "b"], sources, 128, seed=3)
    batches = [sampler.next_batch() for _ in range(20)]
    assert len(calls) == 1
    order = original(1_000_000, 3, 0, 0)
    assert [i for batch in batches for i in batch] == order[: 20 * 128].tolist()
    resumed = MixtureSampler.build(SamplingConfig(strategy="proportional"), ["a", "b"], sources, 128, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(sampler.state_dict())))
    assert resumed.next_batch() == sampler.next_batch()  # the state is small and exact


def test_stratified_batches_hold_each_source_share_exactly():
    sampler = _sampler("stratified", batch=9)
    for _ in range(12):
        counts = Counter(_source_of(i) for i in sampler.next_batch())
        assert counts == {0: 3, 1: 3, 2: 3}
    uneven = _sampler("stratified", batch=8)  # 8 = 2 × 3 + 2: the two extra places rotate over the sources
    totals = Counter(_source_of(i) for _ in range(30) for i in uneven.next_batch())
    assert all(len(Counter(_source_of(i) for i in uneven.next_batch())) == 3 for _ in range(5))
    assert totals == {0: 80, 1: 80, 2: 80}


def test_reweight_warns_about_sources_rarely_in_a_pooled_batch(caplog):
    from types import SimpleNamespace

    from lmrefinery.recipes.reweight import warn_rare_sources

    pool = SimpleNamespace(names=["big", "small"], sizes=[2000, 20], examples=[None] * 2020)
    with caplog.at_level("WARNING"):
        assert warn_rare_sources(pool, 8) == ["small (0.08)"]
    assert "train.sampling=stratified" in caplog.text
    assert warn_rare_sources(SimpleNamespace(names=["a", "b"], sizes=[10, 10], examples=[None] * 20), 8) == []
