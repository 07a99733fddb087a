"""report_to: TensorBoard and W&B receive exactly what metrics.jsonl holds. Both are read back through their own
formats (TensorBoard's EventAccumulator, W&B's protobuf records in the offline run file), not through our code."""

import json
import struct
from pathlib import Path

import pytest

from lmrefinery.train.run_dir import read_metrics
from lmrefinery.train.tracking import scalars
from tests.helpers import run_cli, sft_config, write_yaml


def test_scalars_flatten_nested_numbers_and_leave_out_the_rest():
    record = {"step": 3, "time": 1.0, "event": "validation", "loss": 2, "ok": True, "name": "x",
              "weights": {"a": 0.25, "b": {"c": 1.5}}}
    assert scalars(record) == {"loss": 2.0, "weights/a": 0.25, "weights/b/c": 1.5}


def _tensorboard_scalars(directory: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    values = {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    return values | {"images": events.Tags()["images"]}


def _wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run file: a 7-byte header, then 32 KiB blocks of records (crc32,
    length, kind; kinds 1 = whole, 2/3/4 = first/middle/last piece) each holding one protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pieces, rows = run_file.read_bytes(), 32768, 7, [], []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):  # block padding
            position += left
            continue
        pieces.append(data[position + 7:position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def _wandb_run_files(run: Path) -> list[Path]:
    """One file per W&B session of the run (wandb/latest-run is a link to the newest)."""
    return sorted(path for path in (run / "wandb").glob("*/run-*.wandb") if path.parent.name != "latest-run")


@pytest.fixture
def offline_wandb(monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


def test_training_scalars_and_plots_reach_tensorboard_and_wandb_as_in_metrics_jsonl(tmp_path, tiny_model_dir,
                                                                                     offline_wandb):
    tree = sft_config(tmp_path, tiny_model_dir, steps=4)
    tree["validation"] = {"sources": tree["data"]["sources"][:1], "every": 2, "batch_size": 4}
    tree["report_to"] = ["tensorboard", "wandb"]
    assert run_cli("sft", "--config", write_yaml(tmp_path / "c.yaml", tree)) == 0
    run = tmp_path / "run"
    metrics = read_metrics(run / "metrics.jsonl")
    steps = [m for m in metrics if "loss" in m and "event" not in m]
    validations = [m for m in metrics if m.get("event") == "validation"]
    assert len(steps) == 4 and len(validations) == 2

    board = _tensorboard_scalars(run / "tensorboard")
    for record in steps:
        for key, value in scalars(record).items():
            assert board[key][record["step"]] == pytest.approx(value, rel=1e-6), key
    for record in validations:
        assert board["validation/val_loss"][record["step"]] == pytest.approx(record["val_loss"], rel=1e-6)
    assert "plots/loss" in board["images"]

    (run_file,) = _wandb_run_files(run)
    history = {row["_step"]: row for row in _wandb_history(run_file) if "_step" in row}
    for record in steps:
        for key, value in scalars(record).items():
            assert history[record["step"]][key] == pytest.approx(value, rel=1e-9), key
    for record in validations:
        assert history[record["step"]]["validation/val_loss"] == pytest.approx(record["val_loss"], rel=1e-9)


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, tiny_model_dir, offline_wandb):
    tree = sft_config(tmp_path, tiny_model_dir, steps=2, checkpoint_every=2)
    tree["report_to"] = ["wandb"]
    config = write_yaml(tmp_path / "c.yaml", tree)
    assert run_cli("sft", "--config", config) == 0
    assert run_cli("sft", "--config", config, "--resume", "train.steps=4") == 0
    files = _wandb_run_files(tmp_path / "run")
    assert len(files) == 2 and len({path.name for path in files}) == 1  # two sessions, one run id
    logged = sorted(row["_step"] for path in files for row in _wandb_history(path) if "loss" in row)
    assert logged == [1, 2, 3, 4]


def test_report_to_rejects_an_unknown_tracker(tmp_path, tiny_model_dir, capsys):
    tree = sft_config(tmp_path, tiny_model_dir, steps=1)
    tree["report_to"] = ["mlflow"]
    assert run_cli("sft", "--config", write_yaml(tmp_path / "c.yaml", tree)) == 2
    assert "report_to" in capsys.readouterr().err
