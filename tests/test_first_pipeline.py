"""calibrate, distill, student initialisation and MCQ evaluation on tiny models and designed data."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmrefinery.config import DataConfig, SourceConfig
from lmrefinery.data.mcq_items import load_items, parse_item
from lmrefinery.data.sources import load_pool
from lmrefinery.data.tokenize import ChatEncoder
from lmrefinery.distill.cache import ConcentrationStats, write_manifest, write_shard
from lmrefinery.distill.student import keep_layers
from lmrefinery.evaluation.mcq import letter_token_ids
from lmrefinery.models import find_decoder_layers
from lmrefinery.train.run_dir import read_metrics
from tests.first_helpers import make_cache
from tests.helpers import run_cli, write_yaml
from tests.tiny import FAMILIES, messages_records, save_tiny_model, tiny_model, write_jsonl


def _designed_cache(tmp_path, model_dir, tokenizer, examples: int, right) -> tuple:
    """A held-out cache whose teacher puts 0.97 on its top-1 token at every response position; `right(position)`
    decides (position = index within the example's response) whether that top-1 is the true token."""
    path = write_jsonl(tmp_path / "held.jsonl", messages_records(0, examples))
    data = DataConfig(sources=[SourceConfig(name="held", path=str(path))], max_length=96)
    pool = load_pool(data.sources, ChatEncoder(tokenizer), data)
    probabilities = torch.tensor([0.97, 0.01, 0.008, 0.006, 0.004])
    ids, offsets = [], [0]
    for example in pool.examples:
        truths = [label for label in example.labels[1:] if label != -100]
        for position, label in enumerate(truths):
            wrong = [(label + j) % len(tokenizer) for j in range(1, 6)]
            ids.append([label] + wrong[:4] if right(position) else wrong)
        offsets.append(len(ids))
    directory = tmp_path / "held-cache"
    directory.mkdir()
    count = len(ids)
    write_shard(directory, 0, torch.tensor(ids, dtype=torch.uint16), probabilities.log().repeat(count, 1),
                torch.full((count,), math.log(1 - float(probabilities.sum()))), torch.tensor(offsets), 0,
                ConcentrationStats())
    write_manifest(directory, teacher=str(model_dir), tokenizer=tokenizer, vocab_size=len(tokenizer), k=5,
                   logprob_dtype="float32", pool=pool, data=data.model_dump(mode="json"),
                   model={"name_or_path": str(model_dir)})
    return directory, pool


def _overconfident_cache(tmp_path, model_dir, tokenizer, accuracy=0.6):
    """A cache whose teacher puts 0.97 on its top-1 token but is right only `accuracy` of the time."""
    rng = random.Random(0)
    return _designed_cache(tmp_path, model_dir, tokenizer, 40, lambda position: rng.random() < accuracy)[0]


def test_calibrate_extends_a_grid_that_stops_too_early(tmp_path, tiny_model_dir, tokenizer):
    cache = _overconfident_cache(tmp_path, tiny_model_dir, tokenizer)
    config = write_yaml(tmp_path / "c.yaml", {"output_dir": str(tmp_path / "cal"), "cache": str(cache),
                                              "transform": "logit_temperature", "grid": [0.5, 1.0]})
    assert run_cli("calibrate", "--config", config) == 0
    result = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert result["temperature"] > 1.5 and result["ece_after"] < 0.1  # needs T > 1: the grid grew upward


@pytest.mark.parametrize("transform", ["prob_temperature", "logit_temperature"])
def test_calibrate_lowers_ece_of_an_overconfident_teacher(tmp_path, tiny_model_dir, tokenizer, transform):
    cache = _overconfident_cache(tmp_path, tiny_model_dir, tokenizer)
    config = write_yaml(tmp_path / "c.yaml", {"output_dir": str(tmp_path / "cal"), "cache": str(cache),
                                              "transform": transform})  # each transform's default grid
    assert run_cli("calibrate", "--config", config) == 0
    result = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert result["before"]["accuracy"] == pytest.approx(0.6, abs=0.08)
    assert result["ece_before"] > 0.3  # confidence 0.97, accuracy ≈ 0.6
    assert result["ece_after"] < result["ece_at_temperature_1"] and result["ece_after"] < result["ece_before"]
    assert result["ece_after"] < 0.1
    assert result["ece_after"] == min(point["ece"] for point in result["curve"])
    temperatures = [point["temperature"] for point in result["curve"]]
    assert any(abs(t - round(t, 1)) > 1e-6 for t in temperatures)  # the fine grid was searched
    assert (tmp_path / "cal" / "plots" / "reliability-after.png").exists()
    # the out-of-sample figure is reported beside it: a real miscalibration is fixed out of sample too
    assert result["cross_validation"]["folds"] == 5 and len(result["cross_validation"]["temperatures"]) == 5
    assert result["ece_after_cross_validated"] == result["cross_validation"]["ece"]
    assert result["ece_after"] <= result["ece_after_cross_validated"] < result["ece_before"] - 0.2


def test_distilling_the_teacher_into_itself_has_zero_loss(tmp_path, tiny_model_dir):
    """keep_every 1 makes the student equal to the teacher: with the linear transform the cached distribution is the
    student's own restricted softmax, so the loss is zero — only if cache rows line up with the right positions."""
    cache = make_cache(tmp_path, tiny_model_dir)
    common = {"cache": str(cache), "student": {"init": "keep-layers", "keep_every": 1},
              "train": {"steps": 1, "batch_size": 4, "micro_batch_size": 2, "lr": 0.0}, "save_model": False}
    for mode, transform in (("cache", "linear"), ("online", "linear")):
        out = tmp_path / f"self-{mode}"
        config = dict(common, output_dir=str(out), loss={"mode": mode, "teacher_transform": transform})
        assert run_cli("distill", "--config", write_yaml(tmp_path / f"{mode}.yaml", config)) == 0
        loss = [m["loss"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m][0]
        assert loss == pytest.approx(0.0, abs=1e-5)
    shifted = dict(common, output_dir=str(tmp_path / "other-student"),
                   student={"init": "keep-layers", "keep_layers": [1]},
                   loss={"teacher_transform": "linear", "other_bucket": False})
    assert run_cli("distill", "--config", write_yaml(tmp_path / "other.yaml", shifted)) == 0
    loss = [m["loss"] for m in read_metrics(tmp_path / "other-student" / "metrics.jsonl") if "loss" in m][0]
    assert loss > 1e-3


def test_distill_trains_and_uses_calibrated_temperature(tmp_path, tiny_model_dir):
    cache = make_cache(tmp_path, tiny_model_dir)
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"transform": "prob_temperature", "temperature": 0.3}))
    config = {"output_dir": str(tmp_path / "student"), "cache": str(cache),
              "student": {"init": "keep-layers", "keep_layers": [0]},
              "loss": {"teacher_transform": "prob_temperature", "calibration": str(calibration), "other_bucket": False},
              "train": {"steps": 6, "batch_size": 14, "micro_batch_size": 7, "lr": 1e-3, "warmup_steps": 0,
                        "schedule": "constant"}}  # every step sees the whole pool: the loss must go down
    assert run_cli("distill", "--config", write_yaml(tmp_path / "d.yaml", config)) == 0
    metrics = read_metrics(tmp_path / "student" / "metrics.jsonl")
    assert metrics[0]["temperature"] == 0.3
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < 0.5 * losses[0]
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student" / "model")
    assert student.config.num_hidden_layers == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_layers_student_for_every_family(tmp_path, family):
    teacher = tiny_model(family, layers=4).eval()
    student = keep_layers(teacher, [0, 2])
    blocks = find_decoder_layers(student)
    assert len(blocks) == 2 and student.config.num_hidden_layers == 2
    teacher_blocks = find_decoder_layers(teacher)
    for kept, original in zip(blocks, (teacher_blocks[0], teacher_blocks[2])):
        for a, b in zip(kept.parameters(), original.parameters()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    ids = torch.randint(0, 320, (2, 9))
    student.save_pretrained(tmp_path / family)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / family).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, student.eval()(input_ids=ids).logits)
    assert len(find_decoder_layers(teacher)) == 4  # the teacher is untouched


def test_mcq_item_formats(tmp_path):
    item = parse_item({"question": "2+2?", "options": ["3", "4"], "answer": "b"}, "x")
    assert item.letters == ["A", "B"] and item.gold == 1 and "A. 3\nB. 4" in item.prompt
    assert parse_item({"question": "q", "options": {"A": "x", "B": "y", "C": "z"}, "answer": 2}, "x").gold == 2
    lettered = parse_item({"prompt": "Pick: A) x B) y", "answer": "A"}, "x")
    assert lettered.letters == list("ABCD") and lettered.gold == 0
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "options": ["a", "b"], "answer": "Z"}])
    from lmrefinery.errors import UserError
    with pytest.raises(UserError, match="line 1: 'answer' must be one of"):
        load_items(str(path))


def test_mcq_scores_equal_direct_computation(tmp_path, tiny_model_dir, tokenizer):
    items = [{"question": f"What is {a} plus {b}?", "options": [str(a + b), str(a + b + 1), str(a * b + 7)],
              "answer": i % 3} for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 1), (2, 2), (0, 3)])]
    path = write_jsonl(tmp_path / "mcq.jsonl", items)
    config = {"output_dir": str(tmp_path / "eval"), "task": "mcq", "model": {"name_or_path": str(tiny_model_dir)},
              "data": {"sources": [{"name": "sums", "path": str(path)}]}, "batch_size": 2}
    assert run_cli("evaluate", "--config", write_yaml(tmp_path / "e.yaml", config)) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "eval" / "items.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    correct = []
    for item, row in zip(load_items(str(path)), rows):
        with torch.no_grad():  # one item at a time, no padding: the reference
            logits = model(input_ids=torch.tensor([ChatEncoder(tokenizer).prompt_ids(
                [{"role": "user", "content": item.prompt}])])).logits[0, -1]
        p = torch.softmax(logits.float(), -1)
        variants = letter_token_ids(tokenizer, item.letters)
        assert row["confidence"] == pytest.approx(float(p.max()), abs=1e-5)
        masses = [float(p[v].sum()) for v in variants]
        assert row["option_probabilities"] == pytest.approx([m / sum(masses) for m in masses], abs=1e-5)
        correct.append(int(p.argmax()) in variants[item.gold])
    assert report["overall"]["full_vocabulary"]["accuracy"] == pytest.approx(sum(correct) / len(correct))
    assert report["overall"]["items"] == 5 and (tmp_path / "eval" / "plots" / "reliability.png").exists()


def test_calibrate_by_nll_minimises_the_gold_bucket_nll_computed_directly(tmp_path, tiny_model_dir, tokenizer):
    """objective 'nll': every curve point is the mean −log of the true token's bucket (k cached tokens + the tail),
    recomputed here from the cache rows; the chosen temperature is the curve's minimum."""
    from lmrefinery.distill.cache import TeacherCache

    cache_dir = _overconfident_cache(tmp_path, tiny_model_dir, tokenizer)
    config = write_yaml(tmp_path / "c.yaml", {"output_dir": str(tmp_path / "cal"), "cache": str(cache_dir),
                                              "transform": "logit_temperature", "objective": "nll"})
    assert run_cli("calibrate", "--config", config) == 0
    result = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    cache = TeacherCache(cache_dir)
    data = DataConfig(sources=[SourceConfig(name="held", path=str(tmp_path / "held.jsonl"))], max_length=96)
    pool = load_pool(data.sources, ChatEncoder(tokenizer), data)
    rows = []
    for index, example in enumerate(pool.examples):
        ids, logprobs, tail = cache.rows(index)
        truths = [label for label in example.labels[1:] if label != -100]
        for position, truth in enumerate(truths):
            hits = (ids[position] == truth).nonzero()
            rows.append((torch.cat([logprobs[position].double(), tail[position:position + 1].double()]),
                         int(hits[0, 0]) if len(hits) else ids.shape[1]))

    def direct_nll(temperature):
        return sum(-float(torch.log_softmax(logp / temperature, -1)[gold]) for logp, gold in rows) / len(rows)

    for point in result["curve"][:: max(1, len(result["curve"]) // 5)]:
        assert point["nll"] == pytest.approx(direct_nll(point["temperature"]), rel=1e-4)
    assert result["after"]["nll"] == min(point["nll"] for point in result["curve"])
    assert result["temperature"] > 1.0  # an overconfident teacher needs flattening


def _letter_and_tail_cache(tmp_path, model_dir, tokenizer):
    """The first response position (the "answer letter") is overconfident — 0.97 on a top-1 that is right 55% of
    the time — while every later position is 0.97 and always right."""
    rng = random.Random(1)
    return _designed_cache(tmp_path, model_dir, tokenizer, 60, lambda position: position > 0 or rng.random() < 0.55)


def test_answer_position_calibration_fits_the_letter_positions_only(tmp_path, tiny_model_dir, tokenizer):
    from lmrefinery.distill.cache import TeacherCache
    from lmrefinery.distill.temperature import gather_predictions, search_temperature

    cache_dir, pool = _letter_and_tail_cache(tmp_path, tiny_model_dir, tokenizer)
    chosen = {}
    for positions in ("answer", "all"):
        config = write_yaml(tmp_path / f"{positions}.yaml", {"output_dir": str(tmp_path / positions),
                                                             "cache": str(cache_dir), "positions": positions})
        assert run_cli("calibrate", "--config", config) == 0
        chosen[positions] = json.loads((tmp_path / positions / "calibration.json").read_text())
    # the reference: the same search over the first position of each example, selected here by hand
    cache = TeacherCache(cache_dir)
    rows = [cache.rows(i) for i in range(len(pool.examples))]
    letters = tuple(torch.cat([row[j][:1] for row in rows]) for j in range(3))
    truth = torch.tensor([next(label for label in e.labels[1:] if label != -100) for e in pool.examples])
    targets = torch.where(letters[0][:, 0] == truth, 0, 5)
    expected, _ = search_temperature(letters[1], letters[2], targets)
    assert chosen["answer"]["positions"] == "answer"
    assert chosen["answer"]["temperature"] == expected["temperature"]
    assert chosen["answer"]["after"]["accuracy"] == pytest.approx(float((targets == 0).double().mean()))
    assert chosen["all"]["temperature"] != chosen["answer"]["temperature"]  # the always-right tail pulls c elsewhere
    answer_only = gather_predictions(cache, pool.examples, "answer")
    assert answer_only[0].shape[0] == len(pool.examples)


def _confident_teacher(tmp_path, model_dir) -> Path:
    """The tiny model fine-tuned until it is sure of the training replies (top-5 mass close to 1)."""
    data = write_jsonl(tmp_path / "memorise.jsonl", messages_records(0, 12))
    config = {"output_dir": str(tmp_path / "teacher"), "model": {"name_or_path": str(model_dir)},
              "data": {"sources": [{"name": "m", "path": str(data)}], "max_length": 96},
              "train": {"steps": 40, "batch_size": 12, "micro_batch_size": 12, "lr": 3e-3, "warmup_steps": 0,
                        "schedule": "constant"}}
    assert run_cli("sft", "--config", write_yaml(tmp_path / "teacher.yaml", config)) == 0
    return tmp_path / "teacher" / "model"


def test_distill_warns_when_the_student_mass_on_the_teacher_top_k_stays_low(tmp_path, tiny_model_dir, caplog):
    """A confident teacher's cache. A student with its mass elsewhere (a fresh random model of the same vocabulary:
    on these tiny models a keep-layers student keeps most of the teacher's mass, the embeddings carry the memorised
    replies) ends below 0.5 — the renormalised loss cannot move it — and the run warns with the remedy. The teacher
    distilled into itself keeps its mass: no warning. The logged mass equals the direct computation."""
    from tests.first_helpers import make_cache

    teacher = _confident_teacher(tmp_path, tiny_model_dir)
    cache = make_cache(tmp_path, teacher)
    other = save_tiny_model(tmp_path / "other", "llama", seed=7)
    common = {"cache": str(cache), "train": {"steps": 3, "batch_size": 4, "micro_batch_size": 4, "lr": 1e-4},
              "loss": {"teacher_transform": "linear", "other_bucket": False}}  # the restricted loss warns
    masses = {}
    for name, student in (("fresh", {"init": "model", "name_or_path": str(other)}),
                          ("self", {"init": "keep-layers", "keep_every": 1})):
        caplog.clear()
        config = dict(common, output_dir=str(tmp_path / name), student=student)
        with caplog.at_level("WARNING"):
            assert run_cli("distill", "--config", write_yaml(tmp_path / f"{name}.yaml", config)) == 0
        masses[name] = json.loads((tmp_path / name / "summary.json").read_text())["final_student_topk_mass"]
        warned = any("top-k tokens" in record.getMessage() and "other_bucket" in record.getMessage()
                     for record in caplog.records)
        assert warned == (name == "fresh"), (name, masses)
    assert masses["fresh"] < 0.5 <= masses["self"]
    # The logged figure is the student's full-vocabulary probability of the cached ids, per supervised token. With
    # lr 0 the student does not move, and one step whose batch is the whole pool sees every example once: the
    # logged mass must then equal the token-mean of that probability over the pool, computed directly.
    from lmrefinery.distill.cache import TeacherCache
    from lmrefinery.recipes.common import load_cache_with_data

    _, _, pool, _ = load_cache_with_data(str(cache))
    frozen = dict(common, output_dir=str(tmp_path / "frozen"),
                  student={"init": "model", "name_or_path": str(other), "precision": "fp32"},
                  train={"steps": 1, "batch_size": len(pool.examples), "micro_batch_size": len(pool.examples),
                         "lr": 0.0, "warmup_steps": 0})
    assert run_cli("distill", "--config", write_yaml(tmp_path / "frozen.yaml", frozen)) == 0
    logged = json.loads((tmp_path / "frozen" / "summary.json").read_text())["final_student_topk_mass"]
    student = AutoModelForCausalLM.from_pretrained(other).eval()
    reader, masses_per_token = TeacherCache(cache), []
    for index, example in enumerate(pool.examples):
        ids, _, _ = reader.rows(index)
        with torch.no_grad():
            logits = student(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
        positions = [t for t, label in enumerate(example.labels[1:]) if label != -100]
        masses_per_token.append(torch.softmax(logits[positions].double(), -1).gather(-1, ids).sum(-1))
    direct = float(torch.cat(masses_per_token).mean())
    assert logged == pytest.approx(direct, abs=1e-5)


def test_distill_defaults_to_the_other_bucket(tmp_path, tiny_model_dir):
    """No loss keys: the run is the other-bucket run, step for step, and not the restricted one."""
    cache = make_cache(tmp_path, tiny_model_dir)
    common = {"cache": str(cache), "student": {"init": "keep-layers", "keep_layers": [0]}, "save_model": False,
              "train": {"steps": 3, "batch_size": 4, "micro_batch_size": 4, "lr": 1e-3, "warmup_steps": 0}}
    runs = {}
    for name, loss in (("default", {}), ("bucket", {"other_bucket": True}), ("restricted", {"other_bucket": False})):
        config = dict(common, output_dir=str(tmp_path / name), **({"loss": loss} if loss else {}))
        assert run_cli("distill", "--config", write_yaml(tmp_path / f"{name}.yaml", config)) == 0
        runs[name] = [m["loss"] for m in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in m]
    assert runs["default"] == runs["bucket"] and runs["default"] != runs["restricted"]


@pytest.mark.parametrize("source", ["teacher", "other"])
def test_a_keep_layers_student_holds_every_other_block_of_the_chosen_model(tmp_path, source):
    """keep_every 2 of a 4-block model: blocks 0 and 2 — of the teacher, or of `keep_layers_from` (e.g. the pretrained
    model the teacher came from) — with that model's embeddings, final norm and head."""
    teacher = save_tiny_model(tmp_path / "teacher", "llama", seed=0, layers=4)
    other = save_tiny_model(tmp_path / "other", "llama", seed=5, layers=4)
    cache = make_cache(tmp_path, teacher)
    student = {"init": "keep-layers", "keep_every": 2} | ({"keep_layers_from": str(other)} if source == "other" else {})
    config = {"output_dir": str(tmp_path / "student"), "cache": str(cache), "student": student,
              "train": {"steps": 1, "batch_size": 2, "micro_batch_size": 2, "lr": 0.0, "warmup_steps": 0}}
    assert run_cli("distill", "--config", write_yaml(tmp_path / "d.yaml", config)) == 0
    made = AutoModelForCausalLM.from_pretrained(tmp_path / "student" / "model").state_dict()
    chosen = AutoModelForCausalLM.from_pretrained(teacher if source == "teacher" else other).state_dict()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "student" / "model").config.num_hidden_layers == 2
    for key, value in made.items():
        origin = key
        if ".layers." in key:  # student block i is the chosen model's block 2i
            prefix, rest = key.split(".layers.", 1)
            index, tail = rest.split(".", 1)
            origin = f"{prefix}.layers.{2 * int(index)}.{tail}"
        assert torch.equal(value, chosen[origin]), key
