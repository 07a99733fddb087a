"""Resume refuses what it cannot honour, one live run per directory, the last bad inputs, no unpickling, failed
writes."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmrefinery.train.checkpoint_format import checkpoint_steps, write_checksums
from lmrefinery.train.run_dir import read_metrics
from tests.helpers import REPO, final_weights, losses, run_cli, sft_config, write_yaml
from tests.tiny import messages_records, write_jsonl


def _sft(tmp_path, model_dir, **train):
    train = {"schedule": "constant", "warmup_steps": 0, **train}
    return write_yaml(tmp_path / "c.yaml", sft_config(tmp_path, model_dir, **train))


# ---------------------------------------------------------------------------------------------------------- resume

def test_resume_refuses_a_changed_trajectory_and_continues_an_extended_run(tmp_path, tiny_model_dir, capsys):
    config = _sft(tmp_path, tiny_model_dir, steps=2, checkpoint_every=2)
    assert run_cli("sft", "--config", config) == 0
    assert run_cli("sft", "--config", config, "--resume", "train.lr=0.01") == 2
    err = capsys.readouterr().err
    assert "train.lr would change the run's trajectory" in err and "Traceback" not in err
    assert run_cli("sft", "--config", config, "--resume", "data.sources.0.path=" + str(tmp_path / "b.jsonl")) == 2
    assert "data.sources.0.path" in capsys.readouterr().err
    assert run_cli("sft", "--config", config, "--resume", "train.steps=4", "train.log_every=2") == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    resumed = [m for m in records if m.get("event") == "resume"]
    assert resumed and resumed[0]["changed"] == ["train.log_every", "train.steps"]
    assert checkpoint_steps(tmp_path / "run")[-1] == 4 and [m["step"] for m in records if "loss" in m] == [1, 2, 4]
    # the extended run continues the trajectory: equal to an uninterrupted 4-step run (constant schedule)
    straight = write_yaml(tmp_path / "s.yaml", dict(sft_config(tmp_path, tiny_model_dir, steps=4, schedule="constant",
                                                               warmup_steps=0), output_dir=str(tmp_path / "straight")))
    assert run_cli("sft", "--config", straight) == 0
    assert losses(tmp_path / "run")[-1] == pytest.approx(losses(tmp_path / "straight")[-1], abs=1e-6)


def test_resume_without_a_checkpoint_exits_2(tmp_path, tiny_model_dir, capsys):
    config = _sft(tmp_path, tiny_model_dir, steps=1)
    for prepare in (lambda: None, lambda: (tmp_path / "run").mkdir(), lambda: (tmp_path / "run" / "x").touch()):
        prepare()
        assert run_cli("sft", "--config", config, "--resume") == 2
        assert "no complete checkpoint here to continue from" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, tiny_model_dir):
    config = _sft(tmp_path, tiny_model_dir, steps=2, checkpoint_every=2)
    assert run_cli("sft", "--config", config) == 0
    with (tmp_path / "run" / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "loss": 1.2')  # power lost mid-line
    assert run_cli("sft", "--config", config, "--resume", "train.steps=3") == 0
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m] == [1, 2, 3]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_loss"] == losses(tmp_path / "run")[-1]  # complete after a resume


def test_a_torn_shard_sidecar_is_recomputed_on_teacher_resume(tmp_path, tiny_model_dir):
    from tests.first_helpers import make_cache, teacher_config

    directory = make_cache(tmp_path, tiny_model_dir)
    reference = (directory / "shard-00001.safetensors").read_bytes()
    (directory / "manifest.json").unlink()
    sidecar = directory / "shard-00001.json"
    sidecar.write_text(sidecar.read_text()[:40])
    assert run_cli("teacher", "--config", teacher_config(tmp_path, tiny_model_dir), "--resume") == 0
    assert json.loads(sidecar.read_text())["index"] == 1
    assert (directory / "shard-00001.safetensors").read_bytes() == reference


def test_one_live_run_per_directory(tmp_path, tiny_model_dir, capsys):
    """A process holding the directory's lock makes a second run exit 2 naming it; once it is gone (killed, no
    clean-up) the lock file left behind is taken over."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from lmrefinery.train.run_dir import lock_run_dir; lock_run_dir(Path(sys.argv[2])); print('held', flush=True);"
        "time.sleep(60)"), str(REPO / "src"), str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        config = _sft(tmp_path, tiny_model_dir, steps=1)
        assert run_cli("sft", "--config", config) == 2
        err = capsys.readouterr().err
        assert f'"pid": {holder.pid}' in err and "a run is live in this directory" in err
    finally:
        holder.kill()
        holder.wait()
    assert (run / ".lock").exists()  # stale: its holder died
    assert run_cli("sft", "--config", config) == 0


# ------------------------------------------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("weights", ["nan", ".nan", "Infinity"])
def test_non_finite_weights_exit_2(tmp_path, capsys, weights):
    path = write_jsonl(tmp_path / "a.jsonl", messages_records(0, 3))
    if weights == "Infinity":  # as JSON writes it, in a weights file
        (tmp_path / "w.json").write_text('{"weights": {"a": Infinity}}')
        value = str(tmp_path / "w.json")
    else:
        value = weights
    config = write_yaml(tmp_path / "mix.yaml", {"output_dir": str(tmp_path / "mix"), "num_examples": 3,
                                               "data": {"sources": [{"name": "a", "path": str(path)}]}})
    override = f"weights={value}" if weights == "Infinity" else f"weights.a={value}"
    assert run_cli("mix", "--config", config, override) == 2
    err = capsys.readouterr().err
    assert "weights must be finite numbers" in err and "Traceback" not in err
    assert not (tmp_path / "mix").exists()


def test_nan_sampling_weights_exit_2_leaving_nothing(tmp_path, tiny_model_dir, capsys):
    config = _sft(tmp_path, tiny_model_dir, steps=1)
    assert run_cli("sft", "--config", config, "sampling.strategy=weights", "sampling.weights.a=.nan",
                   "sampling.weights.b=1") == 2
    assert "sampling.weights: weights must be finite numbers" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_truncated_model_file_exits_2(tmp_path, tiny_model_dir, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    config = _sft(tmp_path, broken, steps=1)
    assert run_cli("sft", "--config", config) == 2
    err = capsys.readouterr().err
    assert f"{broken}: cannot load the model" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["sft", "evaluate", "teacher", "mix"])
def test_an_output_dir_that_is_a_file_exits_2(tmp_path, tiny_model_dir, capsys, command):
    blocker = tmp_path / "out"
    blocker.write_text("a file")
    data = write_jsonl(tmp_path / "a.jsonl", messages_records(0, 3))
    sources = [{"name": "a", "path": str(data)}]
    tree = {"sft": sft_config(tmp_path, tiny_model_dir, steps=1),
            "evaluate": {"model": {"name_or_path": str(tiny_model_dir)}, "data": {"sources": sources}},
            "teacher": {"model": {"name_or_path": str(tiny_model_dir)}, "data": {"sources": sources}},
            "mix": {"weights": {"a": 1.0}, "num_examples": 2, "data": {"sources": sources}}}[command]
    tree["output_dir"] = str(blocker)
    assert run_cli(command, "--config", write_yaml(tmp_path / "c.yaml", tree)) == 2
    assert f"{blocker}: output_dir exists and is a file" in capsys.readouterr().err
    assert blocker.read_text() == "a file"


def test_a_learning_rate_that_overflows_is_a_divergence(tmp_path, tiny_model_dir, capsys):
    config = _sft(tmp_path, tiny_model_dir, steps=3, checkpoint_every=1)
    assert run_cli("sft", "--config", config, "train.lr=1e38", "train.max_grad_norm=null") == 3
    err = capsys.readouterr().err
    # one line of its own (not drawn onto the progress bar's line), the last one, and no traceback
    assert err.endswith("\n") and err.splitlines()[-1].startswith("lmrefinery sft: training diverged")
    assert "Traceback" not in err


@pytest.mark.parametrize("item, problem", [
    ({"question": "q", "options": ["a", "b"], "answer": "A", "letters": None}, None),
    ({"prompt": "Pick", "letters": ["A", "B", "A"], "answer": "A"}, "option letters must be distinct"),
    ({"question": "q", "options": {"A": "x", "a": "y"}, "answer": "A"}, "option letters must be distinct"),
    ({"question": "q", "options": ["only"], "answer": "A"}, "at least 2 options"),
])
def test_malformed_multiple_choice_items_exit_2(tmp_path, tiny_model_dir, capsys, item, problem):
    item = {k: v for k, v in item.items() if v is not None}
    path = write_jsonl(tmp_path / "items.jsonl", [item])
    config = write_yaml(tmp_path / "e.yaml", {"output_dir": str(tmp_path / "eval"), "task": "mcq",
                                             "model": {"name_or_path": str(tiny_model_dir)},
                                             "data": {"sources": [{"name": "m", "path": str(path)}]}})
    code = run_cli("evaluate", "--config", config)
    assert code == (0 if problem is None else 2)
    if problem:
        err = capsys.readouterr().err
        assert f"{path} line 1: " in err and problem in err and err.count("\n") == 1


def test_a_key_written_twice_in_a_record_exits_2(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "items.jsonl"
    path.write_text('{"question": "q", "options": ["a", "b"], "answer": "A", "answer": "B"}\n')
    config = write_yaml(tmp_path / "e.yaml", {"output_dir": str(tmp_path / "eval"), "task": "mcq",
                                             "model": {"name_or_path": str(tiny_model_dir)},
                                             "data": {"sources": [{"name": "m", "path": str(path)}]}})
    assert run_cli("evaluate", "--config", config) == 2
    assert f"{path} line 1: key 'answer' appears twice in one object" in capsys.readouterr().err


def test_an_empty_assistant_reply_is_a_bad_record_and_a_bom_is_fine(tmp_path, tiny_model_dir, capsys):
    tree = sft_config(tmp_path, tiny_model_dir, steps=1)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in messages_records(0, 4)).encode())
    tree["data"]["sources"][1]["path"] = str(bom)
    assert run_cli("sft", "--config", write_yaml(tmp_path / "c.yaml", tree), "save_model=false") == 0
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                                 {"role": "assistant", "content": "  "}]}])
    tree["data"]["sources"][1]["path"] = str(empty)
    tree["output_dir"] = str(tmp_path / "run2")
    assert run_cli("sft", "--config", write_yaml(tmp_path / "d.yaml", tree)) == 2
    assert f"{empty} line 1: assistant turn 1 is empty" in capsys.readouterr().err


def test_a_yaml_syntax_error_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: x\ntrain: {steps: 2\n")
    assert run_cli("sft", "--config", path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path} line 3 column 1: not valid YAML" in err


def test_a_mistyped_hub_id_fails_at_once_offline_by_default(tmp_path):
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    data = write_jsonl(tmp_path / "a.jsonl", messages_records(0, 3))
    started = time.perf_counter()
    config = write_yaml(tmp_path / "e.yaml", {"output_dir": str(tmp_path / "e"),
                                             "model": {"name_or_path": "no-such-org/no-such"},
                                             "data": {"sources": [{"name": "a", "path": str(data)}]}})
    result = subprocess.run([sys.executable, "-m", "lmrefinery", "evaluate", "--config", str(config)],
                            env=dict(environment, PYTHONPATH=str(REPO / "src")), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and time.perf_counter() - started < 30
    assert result.stderr.strip().splitlines()[-1].startswith("lmrefinery evaluate: error: no-such-org/no-such:")


# ------------------------------------------------------------------------------------------ checkpoints and writes

class _SideEffect:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/lmrefinery-pickle-side-effect")


def test_a_checkpoint_carrying_a_pickled_object_is_refused_and_never_runs(tmp_path, tiny_model_dir, capsys):
    config = _sft(tmp_path, tiny_model_dir, steps=2, checkpoint_every=1)
    assert run_cli("sft", "--config", config) == 0
    MARKER.unlink(missing_ok=True)
    step = tmp_path / "run" / "checkpoints" / "step-2"
    (shard,) = step.glob("shard-*.safetensors")
    torch.save({"payload": _SideEffect()}, shard)  # a pickle where the tensors were
    write_checksums(step)  # a checkpoint handed over whole: its checksums agree with the pickle
    assert run_cli("sft", "--config", config, "--resume", "train.steps=3") == 2
    err = capsys.readouterr().err
    assert f"{step}: not a readable checkpoint" in err and "Traceback" not in err
    assert not MARKER.exists()


def _limited(limit_bytes: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-size write then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_a_full_disk_stops_cleanly_and_resume_finishes_bit_equal(tmp_path, tiny_model_dir):
    """Step 2's checkpoint is written; the run is resumed to 4 steps under a file-size limit smaller than a
    checkpoint: it stops with exit 2 and one line, step 2 still loads, and resuming without the limit ends exactly
    where an uninterrupted 4-step run ends."""
    config = _sft(tmp_path, tiny_model_dir, steps=2, checkpoint_every=2)
    assert run_cli("sft", "--config", config, "save_model=false") == 0
    environment = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    command = [sys.executable, "-m", "lmrefinery", "sft", "--config", str(config), "--resume", "train.steps=4",
               "save_model=false"]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300,
                            preexec_fn=_limited(32 * 1024))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot write checkpoint step 4" in result.stderr and "step 2 is intact" in result.stderr
    assert "Traceback" not in result.stderr
    assert checkpoint_steps(tmp_path / "run") == [2]
    assert run_cli("sft", "--config", config, "--resume", "train.steps=4", "save_model=false") == 0
    straight = write_yaml(tmp_path / "s.yaml", dict(sft_config(tmp_path, tiny_model_dir, steps=4, schedule="constant",
                                                               warmup_steps=0, checkpoint_every=2),
                                                    output_dir=str(tmp_path / "straight"), save_model=False))
    assert run_cli("sft", "--config", straight) == 0
    resumed = final_weights(tmp_path / "run", 4)
    reference = final_weights(tmp_path / "straight", 4)
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name


@pytest.mark.slow
def test_tied_embeddings_are_saved_identically_from_one_and_two_processes(tmp_path):
    from tests.helpers import run_one_and_two_processes
    from tests.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "qwen", "qwen2")  # ties its head to the embedding
    config = sft_config(tmp_path, model_dir, steps=1, micro_batch_size=1)
    single, double = run_one_and_two_processes(tmp_path, "sft", config)
    one, two = (load_file(str(run / "model" / "model.safetensors")) for run in (single, double))
    assert sorted(one) == sorted(two) and "lm_head.weight" not in two
    sizes = {(run / "model" / "model.safetensors").stat().st_size for run in (single, double)}
    assert len(sizes) == 1
