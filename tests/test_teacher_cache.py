"""The teacher cache: exact round trip, resumable shards, world-size invariance, corruption and mismatch detection."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmrefinery.config import DataConfig, SourceConfig
from lmrefinery.data.sources import load_pool
from lmrefinery.data.tokenize import ChatEncoder
from lmrefinery.distill.cache import TeacherCache
from lmrefinery.errors import UserError
from tests.first_helpers import make_cache, teacher_config
from tests.helpers import run_cli, run_torchrun, write_yaml
from tests.tiny import save_tiny_model


def _pool(tmp_path, tokenizer):
    data = DataConfig(sources=[SourceConfig(name="a", path=str(tmp_path / "a.jsonl")),
                               SourceConfig(name="b", path=str(tmp_path / "b.jsonl"))], max_length=96)
    return load_pool(data.sources, ChatEncoder(tokenizer), data)


def test_cache_round_trip_is_exact(tmp_path, tiny_model_dir, tokenizer):
    cache = TeacherCache(make_cache(tmp_path, tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pool = _pool(tmp_path, tokenizer)
    assert cache.manifest["examples"] == len(pool.examples) == 14 and len(cache.shards) == 4
    positions = 0
    for index, example in enumerate(pool.examples):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
        response = torch.tensor(example.labels[1:]) != -100
        expected = torch.log_softmax(logits[response].float(), -1).topk(5, dim=-1)
        ids, logprobs, tail = cache.rows(index)
        assert torch.equal(ids, expected.indices)
        torch.testing.assert_close(logprobs, expected.values, atol=1e-6, rtol=0)
        torch.testing.assert_close(tail, torch.log1p(-expected.values.exp().sum(-1)), atol=1e-5, rtol=0)
        positions += int(response.sum())
    assert cache.manifest["positions"] == positions
    stats = cache.manifest["concentrated_knowledge"]
    assert [int(k) for k in stats] == list(range(1, 11))
    assert all(stats[str(k)]["mean"] <= stats[str(k + 1)]["mean"] for k in range(1, 10))


def test_rerun_after_a_kill_gives_identical_shards(tmp_path, tiny_model_dir):
    directory = make_cache(tmp_path, tiny_model_dir)
    original = {p.name: p.read_bytes() for p in directory.glob("shard-*.safetensors")}
    # A kill mid-way: shard 2's metadata never written (so it is incomplete), its tensors half-written, a temporary
    # file left behind, and no manifest yet.
    (directory / "shard-00002.json").unlink()
    (directory / "shard-00002.safetensors").write_bytes(b"partial")
    (directory / ".shard-00003.tmp-shard").write_bytes(b"junk")
    (directory / "manifest.json").unlink()
    config = teacher_config(tmp_path, tiny_model_dir)
    assert run_cli("teacher", "--config", config) == 2  # refuses to mix runs without --resume
    assert run_cli("teacher", "--config", config, "--resume") == 0
    assert {p.name: p.read_bytes() for p in directory.glob("shard-*.safetensors")} == original
    assert not list(directory.glob(".*tmp*"))
    TeacherCache(directory)  # the manifest is back and every checksum matches


def test_two_processes_give_the_same_cache(tmp_path, tiny_model_dir):
    one = TeacherCache(make_cache(tmp_path, tiny_model_dir, "one"))
    result = run_torchrun(2, "teacher", "--config", teacher_config(tmp_path, tiny_model_dir, "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    two = TeacherCache(tmp_path / "two")
    assert one.manifest["examples_fingerprint"] == two.manifest["examples_fingerprint"]
    for index in range(one.manifest["examples"]):
        for a, b in zip(one.rows(index), two.rows(index)):
            assert torch.equal(a, b)


def test_flipped_byte_is_detected(tmp_path, tiny_model_dir, capsys):
    directory = make_cache(tmp_path, tiny_model_dir)
    shard = directory / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch"):
        TeacherCache(directory)
    config = write_yaml(tmp_path / "cal.yaml", {"output_dir": str(tmp_path / "cal"), "cache": str(directory)})
    assert run_cli("calibrate", "--config", config) == 2
    assert "shard-00001.safetensors: checksum mismatch" in capsys.readouterr().err


def _student_with_vocabulary(directory, rows):
    from safetensors.torch import save_file

    save_tiny_model(directory, "llama")
    config = json.loads((directory / "config.json").read_text())
    config["vocab_size"] = rows
    (directory / "config.json").write_text(json.dumps(config))
    weights = load_file(str(directory / "model.safetensors"))
    for name in list(weights):
        if weights[name].shape[0] == 320:
            extra = rows - 320
            weights[name] = (torch.cat([weights[name], torch.zeros(extra, *weights[name].shape[1:])]) if extra > 0
                             else weights[name][:rows].clone())
    save_file(weights, str(directory / "model.safetensors"))
    return directory


def _distill_config(tmp_path, cache, student):
    return write_yaml(tmp_path / "d.yaml", {
        "output_dir": str(tmp_path / "student"), "cache": str(cache),
        "student": {"init": "model", "name_or_path": str(student)}, "train": {"steps": 1, "batch_size": 2}})


def test_student_vocabulary_smaller_than_the_cache_exits_2(tmp_path, tiny_model_dir, capsys):
    cache = make_cache(tmp_path, tiny_model_dir)
    small = _student_with_vocabulary(tmp_path / "small", 300)
    assert run_cli("distill", "--config", _distill_config(tmp_path, cache, small)) == 2
    assert "vocabulary (300 rows) is smaller than the cache needs (320" in capsys.readouterr().err
    assert not (tmp_path / "student").exists()
    padded = _student_with_vocabulary(tmp_path / "padded", 384)  # padding rows, as some model families have
    assert run_cli("distill", "--config", _distill_config(tmp_path, cache, padded)) == 0


def test_student_with_another_tokenizer_exits_2(tmp_path, tiny_model_dir, capsys):
    from tests.tiny import tiny_tokenizer

    cache = make_cache(tmp_path, tiny_model_dir)
    other = save_tiny_model(tmp_path / "other", "llama")
    changed = tiny_tokenizer()
    changed.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    changed.save_pretrained(other)
    assert run_cli("distill", "--config", _distill_config(tmp_path, cache, other)) == 2
    assert "different vocabulary from the teacher's (1 tokens differ, e.g. ['<|tool|>'])" in capsys.readouterr().err


def test_base_model_student_without_a_chat_template_is_accepted(tmp_path, tiny_model_dir):
    """The paper's setting: a pretrained base model shares the teacher's vocabulary but has no chat template. It is
    trained on the teacher-tokenised data (the cache's own examples) and saved with the teacher's tokenizer."""
    from transformers import AutoTokenizer

    from tests.tiny import tiny_model, tiny_tokenizer

    cache = make_cache(tmp_path, tiny_model_dir)
    base = tmp_path / "base"
    tiny_model("llama", seed=1).save_pretrained(base)
    tiny_tokenizer(chat_template=None).save_pretrained(base)
    assert not AutoTokenizer.from_pretrained(base).chat_template
    assert run_cli("distill", "--config", _distill_config(tmp_path, cache, base)) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "student" / "model").chat_template  # the data's template


def test_resume_recomputes_shards_made_with_other_settings(tmp_path, tiny_model_dir):
    directory = make_cache(tmp_path, tiny_model_dir)  # k = 5
    (directory / "manifest.json").unlink()
    (directory / "shard-00003.json").unlink()
    assert run_cli("teacher", "--config", teacher_config(tmp_path, tiny_model_dir), "k=3", "--resume") == 0
    cache = TeacherCache(directory)
    assert cache.k == 3 and all(cache.rows(i)[0].shape[1] == 3 for i in range(cache.manifest["examples"]))


def test_cache_bytes_per_position(tmp_path, tiny_model_dir):
    directory = make_cache(tmp_path, tiny_model_dir, logprob_dtype="float16")
    manifest = json.loads((directory / "manifest.json").read_text())
    tensors = [load_file(str(directory / s["file"])) for s in manifest["shards"]]
    assert all(t["ids"].dtype == torch.uint16 and t["logprobs"].dtype == torch.float16 for t in tensors)
    payload = sum(t["ids"].nbytes + t["logprobs"].nbytes + t["tail"].nbytes for t in tensors)
    assert payload / manifest["positions"] == 5 * 2 + 5 * 2 + 2
    assert np.isclose(sum(s["positions"] for s in manifest["shards"]), manifest["positions"])
