"""What a new user meets first: --help that lists every key, errors that say where a bad key came from and what was
meant, paths that work from any directory, loss plots, and the best-validation model kept on request."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lmrefinery.cli import COMMANDS, _parser, config_class
from lmrefinery.config.keys import config_keys
from lmrefinery.train.checkpoint_load import full_tensors
from lmrefinery.train.run_dir import read_metrics
from tests.helpers import run_cli, sft_config, write_yaml


def _help(command: str) -> str:
    parser = _parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[command].format_help()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_every_config_key_and_only_the_options_the_command_honours(command):
    import typing

    text = _help(command)
    cls = config_class(command)
    members = [cls] if isinstance(cls, type) else [typing.get_args(member)[0]
                                                   for member in typing.get_args(typing.get_args(cls)[0])]
    for member in members:
        for key in config_keys(member):
            assert f"  {key.key}  [" in text, f"{command}: {key.key} missing from --help"
    assert "docs: docs/" in text
    assert ("[--resume]" in text) == COMMANDS[command][1]  # the option itself (output_dir's help may mention it)


def test_unknown_keys_suggest_the_closest_and_name_where_they_came_from(tmp_path, capsys):
    tree = sft_config(tmp_path, tmp_path)
    tree["train"]["warmup_step"] = 3  # a typo in the file
    path = write_yaml(tmp_path / "c.yaml", tree)
    assert run_cli("sft", "--config", path, "train.lrr=1e-4") == 2
    err = capsys.readouterr().err
    assert f"{path}: train.warmup_step: unknown key (did you mean train.warmup_steps?)" in err
    assert "command line: train.lrr: unknown key (did you mean train.lr?)" in err
    assert run_cli("mix", "output_dir=x", "sources.0.path=y") == 2  # mix takes data.sources like every command
    err = capsys.readouterr().err
    assert err.startswith("lmrefinery mix: error: command line: ") and "sources: unknown key" in err


def test_paths_in_a_config_file_are_relative_to_the_file_and_work_from_any_directory(tmp_path, tiny_model_dir,
                                                                                      monkeypatch):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    tree = sft_config(project, tiny_model_dir, steps=1)
    tree["output_dir"] = "../runs/sft"
    for source in tree["data"]["sources"]:
        source["path"] = os.path.relpath(source["path"], project / "configs")
    config = write_yaml(project / "configs" / "sft.yaml", tree)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run_cli("sft", "--config", config) == 0
    assert (project / "runs" / "sft" / "model" / "config.json").exists()
    # a path on the command line is relative to the working directory, as in a shell
    assert run_cli("sft", "--config", config, "output_dir=here", "save_model=false") == 0
    assert (elsewhere / "here" / "summary.json").exists()


def test_keep_best_saves_the_best_validation_weights_as_the_model(tmp_path, tiny_model_dir, caplog):
    """A learning rate that first helps then hurts: the last validation loss is far above the best. With
    train.keep_best the model is that best step's checkpoint; the summary has both losses and the run warns."""
    tree = sft_config(tmp_path, tiny_model_dir, steps=8, lr=0.1, warmup_steps=0, schedule="constant",
                      checkpoint_every=100, keep_last=1, keep_best=True, max_grad_norm=None)
    tree["validation"] = {"sources": tree["data"]["sources"][:1], "every": 1, "batch_size": 4}
    with caplog.at_level("WARNING"):
        assert run_cli("sft", "--config", write_yaml(tmp_path / "c.yaml", tree)) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    validation = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m.get("event") == "validation"]
    best = min(validation, key=lambda m: m["val_loss"])
    assert summary["best_val_loss"] == best["val_loss"] and summary["best_val_step"] == best["step"]
    assert summary["last_val_loss"] == validation[-1]["val_loss"] > 1.1 * best["val_loss"]
    assert summary["model_step"] == best["step"] < 8
    assert any("above its best" in r.getMessage() for r in caplog.records)
    checkpoint = full_tensors(tmp_path / "run" / "checkpoints" / f"step-{best['step']}")
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    for name, tensor in checkpoint.items():
        torch.testing.assert_close(saved[name], tensor, atol=0, rtol=0)
    assert (tmp_path / "run" / "plots" / "loss.png").stat().st_size > 5_000


def test_distill_draws_its_loss_plot(tmp_path, tiny_model_dir):
    from tests.first_helpers import make_cache

    cache = make_cache(tmp_path, tiny_model_dir)
    config = {"output_dir": str(tmp_path / "student"), "cache": str(cache), "save_model": False,
              "student": {"init": "keep-layers", "keep_layers": [0]}, "train": {"steps": 2, "batch_size": 4}}
    assert run_cli("distill", "--config", write_yaml(tmp_path / "d.yaml", config)) == 0
    assert (tmp_path / "student" / "plots" / "loss.png").stat().st_size > 5_000
    assert json.loads((tmp_path / "student" / "summary.json").read_text())["final_loss"] > 0
