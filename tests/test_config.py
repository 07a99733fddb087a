"""Configs: every shipped YAML validates; unknown keys and bad values exit 2 naming the key path."""

from pathlib import Path

import pytest
import yaml

from lmrefinery.cli import COMMANDS, config_class
from lmrefinery.config import SFTConfig, apply_override, load_config
from lmrefinery.errors import UserError
from tests.helpers import run_cli, sft_config, write_yaml

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").glob("**/*.yaml"))


def _command_of(path: Path) -> str:
    command = path.stem.split("-")[0]
    assert command in COMMANDS, f"{path.name}: shipped configs are named <command>-<what>.yaml"
    return command


def test_configs_are_shipped():
    assert SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(config_class(_command_of(path)), path)


def test_overrides_reach_nested_keys_and_list_items(tmp_path):
    tree = sft_config(tmp_path, tmp_path)
    path = write_yaml(tmp_path / "c.yaml", tree)
    config = load_config(SFTConfig, path, ["train.lr=1e-4", "data.sources.1.name=renamed", "train.max_grad_norm=null",
                                           "model.precision=bf16"])
    assert config.train.lr == 1e-4 and config.data.sources[1].name == "renamed"
    assert config.train.max_grad_norm is None and config.model.precision == "bf16"


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1", "train.lrr: unknown key"),
    ("train.lr=fast", "train.lr: input should be a valid number"),
    ("model.precision=fp8", "model.precision: input should be 'auto', 'fp32' or 'bf16'"),
    ("train.batch_size=0", "train.batch_size: input should be greater than or equal to 1"),
    ("data.sources.0.name=b", "data.sources: value error, source names must be unique"),
    ("sampling.strategy=weights", "sampling: value error, strategy 'weights' needs sampling.weights"),
])
def test_bad_keys_and_values_exit_2_naming_the_path(tmp_path, capsys, override, expected):
    path = write_yaml(tmp_path / "c.yaml", sft_config(tmp_path, tmp_path))
    assert run_cli("sft", "--config", path, override) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_bad_override_syntax():
    with pytest.raises(UserError, match="list index"):
        apply_override({"data": {"sources": [{}]}}, ["data", "sources", "3", "name"], "x")


def test_resolved_config_is_saved(tmp_path, tiny_model_dir):
    path = write_yaml(tmp_path / "c.yaml", sft_config(tmp_path, tiny_model_dir, steps=1))
    assert run_cli("sft", "--config", path, "train.lr=0.0005") == 0
    saved = load_config(SFTConfig, tmp_path / "run" / "config.yaml")
    assert saved.train.lr == 0.0005 and saved.train.warmup_ratio == 0.03  # defaults resolved and written


def _paths_in(tree) -> list[str]:
    if isinstance(tree, dict):
        return [p for value in tree.values() for p in _paths_in(value)]
    if isinstance(tree, list):
        return [p for value in tree for p in _paths_in(value)]
    return [tree] if isinstance(tree, str) and tree.startswith("../demo-out/data/") else []


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_read_files_the_demo_writes(path):
    from lmrefinery.compare.data import layout
    from lmrefinery.config.experiment import PRESETS

    written = layout(Path("../demo-out/data"), PRESETS["default"]())
    files = {str(p) for p in written["sources"].values()} | {str(written["validation"]), str(written["test"])}
    files |= {str(p) for p in written["mcq"].values()}
    tree = yaml.safe_load(path.read_text())
    for data_path in _paths_in(tree):
        assert data_path in files, f"{path.name}: {data_path} is not a file `lmrefinery demo` writes"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_prints_a_real_default_for_every_key(command, capsys):
    with pytest.raises(SystemExit):
        run_cli(command, "--help")
    text = capsys.readouterr().out
    assert "config keys" in text and "PydanticUndefined" not in text
    if command == "sft":  # a default made by a factory (an empty list) is printed as its value
        assert "report_to  [list" in text and "default []]" in text


def _compare_tree(tmp_path, distillation_sources_key: str) -> dict:
    item_file = str(tmp_path / "items.jsonl")
    return {"output_dir": str(tmp_path / "out"), "train": {"steps": 1},
            "distillation": {"teacher": {"name_or_path": "t"}, "validation_items": item_file,
                             "test_items": item_file,
                             distillation_sources_key: [{"name": "mcq", "path": "./train.jsonl"}]}}


def test_a_renamed_key_still_reads_for_one_release_with_a_one_line_notice(tmp_path, caplog):
    from lmrefinery.config import CompareConfig
    new = load_config(CompareConfig, write_yaml(tmp_path / "new.yaml", _compare_tree(tmp_path, "train_sources")))
    assert not [r for r in caplog.records if "is now" in r.getMessage()]
    old = load_config(CompareConfig, write_yaml(tmp_path / "old.yaml", _compare_tree(tmp_path, "train")))
    notices = [r.getMessage() for r in caplog.records if "is now" in r.getMessage()]
    assert notices == ["config key distillation.train is now distillation.train_sources; the old name will be "
                       "removed in the next release"]
    # the old key's relative path resolves against the config file, as the new key's does
    assert old.distillation.train_sources == new.distillation.train_sources
    assert old.distillation.train_sources[0].path == str((tmp_path / "train.jsonl").resolve())
    # as an override too, and errors under the old name still say they came from the command line
    tree = _compare_tree(tmp_path, "train_sources")
    path = write_yaml(tmp_path / "o.yaml", tree)
    changed = load_config(CompareConfig, path, ["distillation.train.0.name=other"])
    assert changed.distillation.train_sources[0].name == "other"
    with pytest.raises(UserError, match="command line: distillation.train_sources.0.limit"):
        load_config(CompareConfig, path, ["distillation.train.0.limit=zero"])
    both = _compare_tree(tmp_path, "train") | {}
    both["distillation"]["train_sources"] = both["distillation"]["train"]
    with pytest.raises(UserError, match="give only train_sources"):
        load_config(CompareConfig, write_yaml(tmp_path / "both.yaml", both))
