"""Faults a cluster job meets: `--resume auto` (what an elastic restart needs), checkpoints that rot on disk, teacher
cache shards that go missing or come from another cache, ScaleBiO numbers that go bad — and a rank killed under
torchrun --max-restarts, after which the job restarts itself and ends as if nothing happened."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmrefinery.train.checkpoint_format import CHECKSUMS, checkpoint_steps
from lmrefinery.train.run_dir import read_metrics
from tests.first_helpers import make_cache, teacher_config
from tests.helpers import REPO, final_weights, losses, run_cli, sft_config, write_yaml


def _same_weights(run: Path, reference: Path, step: int, name: str = "model") -> None:
    ours, theirs = final_weights(run, step, name), final_weights(reference, step, name)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def _uninterrupted(tmp_path: Path, config: dict) -> Path:
    reference = tmp_path / "uninterrupted"
    assert run_cli("sft", "--config", write_yaml(tmp_path / "ref.yaml", dict(config, output_dir=str(reference)))) == 0
    return reference


# ---- --resume auto --------------------------------------------------------------------------------------------------

def test_resume_auto_starts_afresh_continues_from_a_checkpoint_and_still_refuses_a_changed_run(tmp_path,
                                                                                               tiny_model_dir):
    config = sft_config(tmp_path, tiny_model_dir)
    reference = _uninterrupted(tmp_path, config)
    run = Path(config["output_dir"])
    path = write_yaml(tmp_path / "run.yaml", config)
    # nothing there: a fresh run, equal to the reference
    assert run_cli("sft", "--config", path, "--resume", "auto") == 0
    assert losses(run) == losses(reference)
    # killed after checkpoint 3: continues from it, bit-equal, no metrics line twice
    shutil.rmtree(run / "checkpoints" / "step-6")
    assert run_cli("sft", "--config", path, "--resume", "auto") == 0
    _same_weights(run, reference, 6)
    steps = [m["step"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert steps == sorted(set(steps)) == list(range(1, 7))
    # a changed trajectory is refused, as with --resume
    shutil.rmtree(run / "checkpoints" / "step-6")
    assert run_cli("sft", "--config", path, "--resume", "auto", "train.lr=0.1") == 2


def test_resume_auto_replaces_a_run_that_died_before_its_first_checkpoint(tmp_path, tiny_model_dir):
    """Only metrics.jsonl and config.yaml of a dead run: --resume auto starts afresh (without it the directory is
    refused), and the new metrics.jsonl holds one start line and each step once. The config key does the same."""
    config = sft_config(tmp_path, tiny_model_dir)
    reference = _uninterrupted(tmp_path, config)
    run = Path(config["output_dir"])
    run.mkdir()
    shutil.copy(reference / "config.yaml", run / "config.yaml")
    lines = (reference / "metrics.jsonl").read_text().splitlines()[:3]  # start line + two steps, no checkpoint
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    path = write_yaml(tmp_path / "run.yaml", config)
    assert run_cli("sft", "--config", path) == 2
    assert run_cli("sft", "--config", path, "resume=auto") == 0
    records = read_metrics(run / "metrics.jsonl")
    assert [r.get("event") for r in records].count("start") == 1
    assert losses(run) == losses(reference)


# ---- checkpoints that prove themselves ------------------------------------------------------------------------------

def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _shard(directory: Path) -> Path:
    """The one shard file of a single-process checkpoint."""
    (shard,) = directory.glob("shard-*.safetensors")
    return shard


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["flip a weight byte", "truncate the shard", "delete the checksum record"])
def test_a_rotten_newest_checkpoint_is_named_skipped_and_the_run_still_ends_bit_equal(tmp_path, tiny_model_dir,
                                                                                      caplog, damage):
    config = sft_config(tmp_path, tiny_model_dir, steps=9, checkpoint_every=3)
    reference = _uninterrupted(tmp_path, config)
    run = Path(config["output_dir"])
    path = write_yaml(tmp_path / "run.yaml", config)
    assert run_cli("sft", "--config", path) == 0
    shutil.rmtree(run / "checkpoints" / "step-9")  # killed after step 6; then step 6's files rot
    newest = run / "checkpoints" / "step-6"
    shard = _shard(newest)  # weights and optimizer state: one process writes one shard file
    assert json.loads((newest / CHECKSUMS).read_text()).keys() == {shard.name, "state.json", "rng-rank0.json"}
    {"flip a weight byte": lambda: _flip_a_byte(shard),
     "truncate the shard": lambda: _truncate(shard),
     "delete the checksum record": lambda: (newest / CHECKSUMS).unlink()}[damage]()
    with caplog.at_level("WARNING"):
        assert run_cli("sft", "--config", path, "--resume") == 0
    named = [r.getMessage() for r in caplog.records if "checkpoint step 6 is not used" in r.getMessage()]
    assert len(named) == 1 and str(newest) in named[0]
    resumed = [m for m in read_metrics(run / "metrics.jsonl") if m.get("event") == "resume"]
    assert [m["step"] for m in resumed] == [3]  # from the previous complete checkpoint
    _same_weights(run, reference, 9)
    assert losses(run) == losses(reference)


def test_when_no_checkpoint_verifies_resume_exits_2_naming_the_file(tmp_path, tiny_model_dir, capsys):
    config = sft_config(tmp_path, tiny_model_dir)
    path = write_yaml(tmp_path / "run.yaml", config)
    assert run_cli("sft", "--config", path) == 0
    run = Path(config["output_dir"])
    for step in checkpoint_steps(run):
        _flip_a_byte(_shard(run / "checkpoints" / f"step-{step}"))
    capsys.readouterr()
    assert run_cli("sft", "--config", path, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert f"{_shard(run / 'checkpoints' / 'step-6')}: does not match its checksum" in err[-1]


# ---- teacher caches with a missing or foreign shard -----------------------------------------------------------------

def _distill_config(tmp_path: Path, cache: Path) -> Path:
    return write_yaml(tmp_path / "distill.yaml", {
        "output_dir": str(tmp_path / "student"), "cache": str(cache),
        "student": {"init": "keep-layers", "keep_layers": [0]},
        "train": {"steps": 1, "batch_size": 2, "micro_batch_size": 2}})


def test_distill_names_a_missing_or_foreign_shard_and_teacher_resume_auto_recomputes_only_the_missing_one(
        tmp_path, tiny_model_dir, capsys):
    from tests.tiny import save_tiny_model

    cache = make_cache(tmp_path, tiny_model_dir)  # 14 examples in shards of 4: shard-00000 … shard-00003
    cached_files = lambda: {p.name: p.read_bytes() for p in cache.iterdir()  # noqa: E731
                            if p.is_file() and p.name != ".lock"}  # the lock names its holder: not cache content
    full = cached_files()
    shard = sorted(cache.glob("shard-*.safetensors"))[1]
    # a foreign shard: the same position from a cache of another teacher
    other = make_cache(tmp_path, save_tiny_model(tmp_path / "other-teacher", "llama", seed=9), name="other")
    shutil.copy(other / shard.name, shard)
    capsys.readouterr()
    assert run_cli("distill", "--config", _distill_config(tmp_path, cache)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and shard.name in err[0] and "Traceback" not in err[0]
    # a missing shard: named too
    shard.unlink()
    for sidecar in cache.glob(f"{shard.stem}*.json"):
        sidecar.unlink()
    assert run_cli("distill", "--config", _distill_config(tmp_path, cache)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and shard.name in err[0]
    # teacher --resume auto computes that shard alone; the cache is then byte for byte the full run's
    untouched = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*") if p.stem != shard.stem}
    assert run_cli("teacher", "--config", teacher_config(tmp_path, tiny_model_dir), "--resume", "auto") == 0
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*") if p.stem != shard.stem} == untouched
    assert cached_files() == full


# ---- ScaleBiO numbers that go bad -----------------------------------------------------------------------------------

def test_a_lambda_that_overflows_stops_reweight_with_exit_3_keeping_the_good_checkpoint_and_weights(
        tmp_path, tiny_model_dir, capsys):
    from tests.test_reweight import _reweight_config

    config = _reweight_config(tmp_path, tiny_model_dir, steps=6, checkpoint_every=2)
    # λ is float64; Adam moves it by about lr per step in the gradient's direction: ±1e308, then past the largest double
    config["scalebio"]["lr_weights"] = 1e308
    assert run_cli("reweight", "--config", write_yaml(tmp_path / "rw.yaml", config)) == 3
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("lmrefinery reweight: training diverged") and "Traceback" not in err
    run = tmp_path / "run"
    result = json.loads((run / "weights.json").read_text())
    assert "non-finite" in result["diverged"]
    assert all(0 <= w <= 1 for w in result["weights"].values()) and abs(sum(result["weights"].values()) - 1) < 1e-6
    for step in checkpoint_steps(run):  # what is on disk is good
        state = json.loads((run / "checkpoints" / f"step-{step}" / "state.json").read_text())
        assert state["step"] == step


# ---- a rank dies under torchrun; the job restarts itself ------------------------------------------------------------

def _workers(launcher: int) -> dict[int, int]:
    """rank → pid of the launcher's worker processes (read from their environment)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        variables = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if parent == launcher and b"RANK" in variables and b"TORCHELASTIC_RESTART_COUNT" in variables:
            if variables[b"TORCHELASTIC_RESTART_COUNT"] == b"0":
                found[int(variables[b"RANK"])] = int(entry.name)
    return found


def _torchrun_killing_rank_1(command: str, config_path: Path, metrics: Path, after_step: int) -> tuple[int, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    launcher = subprocess.Popen(
        # --standalone: the c10d rendezvous on a free local port; each restart is a new rendezvous round (a static
        # rendezvous would hand the restarted workers the dead round's addresses)
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
         "-m", "lmrefinery", command, "--config", str(config_path), "--resume", "auto"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed, deadline = False, time.time() + 600
    while launcher.poll() is None and time.time() < deadline:
        if not killed and metrics.exists():
            done = [m.get("step", 0) for m in read_metrics(metrics) if "event" not in m]
            if done and max(done) >= after_step and 1 in (workers := _workers(launcher.pid)):
                os.kill(workers[1], signal.SIGKILL)
                killed = True
        time.sleep(0.2)
    output = launcher.communicate(timeout=60)[0].decode(errors="replace")
    assert killed, output[-3000:]
    return launcher.returncode, output


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sft", "reweight"])
def test_a_rank_killed_under_torchrun_restarts_and_ends_bit_equal(tmp_path, tiny_model_dir, command):
    from tests.helpers import run_torchrun
    from tests.test_reweight import _reweight_config

    if command == "sft":
        config = sft_config(tmp_path, tiny_model_dir, steps=8, checkpoint_every=2)
        names, step = ("model",), 8
    else:
        config = _reweight_config(tmp_path, tiny_model_dir, steps=8, checkpoint_every=2, micro_batch_size=4)
        names, step = ("lower", "upper"), 8
    reference, run = tmp_path / "uninterrupted", tmp_path / "restarted"
    result = run_torchrun(2, command, "--config", write_yaml(tmp_path / "ref.yaml",
                                                             dict(config, output_dir=str(reference))))
    assert result.returncode == 0, result.stderr[-3000:]
    path = write_yaml(tmp_path / "run.yaml", dict(config, output_dir=str(run)))
    returncode, output = _torchrun_killing_rank_1(command, path, run / "metrics.jsonl", after_step=3)
    assert returncode == 0, output[-4000:]
    for name in names:
        _same_weights(run, reference, step, name)
    records = [m for m in read_metrics(run / "metrics.jsonl") if "event" not in m]
    assert [m["step"] for m in records] == list(range(1, step + 1))  # no line twice
    strip = lambda m: {k: v for k, v in m.items() if k not in ("time", "step_time_s", "tokens_per_s",  # noqa: E731
                                                               "peak_memory_bytes")}
    expected = [m for m in read_metrics(reference / "metrics.jsonl") if "event" not in m]
    assert [strip(m) for m in records] == [strip(m) for m in expected]
    if command == "reweight":
        assert json.loads((run / "weights.json").read_text())["weights"] == \
            json.loads((reference / "weights.json").read_text())["weights"]
