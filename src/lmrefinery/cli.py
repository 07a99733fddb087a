"""`lmrefinery <command> [--config FILE.yaml] [key=value ...] [--resume]`.

Each command is a recipe plus its config class. User errors exit 2 with one line; a diverged run exits 3.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
import typing


def _offline_by_default() -> None:
    """Model and data locations resolve locally unless the user opts into the network (LMREFINERY_ONLINE=1, or the
    Hugging Face variables set explicitly): a mistyped hub id then fails at once instead of retrying for a minute."""
    if os.environ.get("LMREFINERY_ONLINE") not in (None, "", "0"):
        return
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(variable, "1")


# Before the imports below: huggingface_hub and datasets read these variables once, when they are first imported.
_offline_by_default()

from lmrefinery import __version__  # noqa: E402
from lmrefinery.config import load_config  # noqa: E402
from lmrefinery.config.commands import EVALUATE_TASKS  # noqa: E402
from lmrefinery.config.keys import config_keys  # noqa: E402
from lmrefinery.errors import TrainingDiverged, UserError  # noqa: E402
from lmrefinery.logs import configure_logging  # noqa: E402
from lmrefinery.train.distributed import teardown_distributed  # noqa: E402
from lmrefinery.train.run_dir import release_run_locks  # noqa: E402

# command → (config class in lmrefinery.config, resumable with --resume, one-line help). A single-stage command's
# code is lmrefinery.recipes.<command> (dashes as underscores); `compare` and `demo` run other commands as stages and
# live in lmrefinery.compare, the layer above the recipes. Each is imported only when it runs.
COMMANDS = {
    "sft": ("SFTConfig", True, "fine-tune on one or several sources with a chosen sampling"),
    "reweight": ("ReweightConfig", True, "learn per-source data weights with ScaleBiO"),
    "mix": ("MixConfig", False, "draw an SFT set of N examples with learned weights"),
    "teacher": ("TeacherConfig", True, "cache a teacher's top-k token probabilities"),
    "calibrate": ("CalibrateConfig", False, "fit the teacher temperature that minimises ECE"),
    "distill": ("DistillConfig", True, "distil a student from the top-k cache (FIRST)"),
    "evaluate": ("EvaluateConfig", False, "held-out loss per source, MCQ accuracy and calibration, or lm-eval tasks"),
    "calibration-report": ("CalibrationReportConfig", False, "calibration report of lm-eval --log_samples files"),
    "demo": ("DemoConfig", False, "the whole story on the embedded default model and data"),
    "compare": ("CompareConfig", False, "the papers' baselines side by side under one budget"),
}
MODULES = {"compare": "lmrefinery.compare.run", "demo": "lmrefinery.compare.demo"}
# old command name → new one: still accepted for one release, with a one-line notice
RENAMED_COMMANDS = {"calibration": "calibration-report"}
TAKES_FILES = ("calibration-report",)  # lm-eval's samples files are passed positionally, like lm-eval's own outputs


def config_class(command: str):
    return getattr(importlib.import_module("lmrefinery.config"), COMMANDS[command][0])


def recipe(command: str):
    return importlib.import_module(MODULES.get(command, f"lmrefinery.recipes.{command.replace('-', '_')}"))


DOCS = {"teacher": "teacher.md", "calibrate": "calibrate.md"}  # every other command: docs/<command>.md


def _keys_help(command: str) -> str:
    """The command's config keys (type, default, meaning) and its doc page, for --help."""
    cls = config_class(command)
    union = [] if isinstance(cls, type) else typing.get_args(typing.get_args(cls)[0])  # evaluate: one per task
    members = [typing.get_args(member)[0] for member in union] or [cls]
    lines = [f"docs: docs/{DOCS.get(command, command + '.md')}", "", "config keys (YAML, or key=value overrides):"]
    for member in members:
        if union:
            lines += ["", f"  with task: {typing.get_args(member.model_fields['task'].annotation)[0]}"]
        for key in config_keys(member):
            meaning = f"  {key.description}" if key.description else ""
            lines.append(f"  {key.key}  [{key.type}; default {key.default}]{meaning}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmrefinery", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lmrefinery {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, resumable, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text, epilog=_keys_help(name),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_argument("--config", help="YAML config file")
        if resumable:
            command.add_argument("--resume", action="store_true",
                                 help="continue from the newest complete checkpoint; '--resume auto': continue when "
                                      "there is one, start afresh when there is none (elastic restarts)")
            command.add_argument("--resume-auto", action="store_true", help=argparse.SUPPRESS)
        if name in TAKES_FILES:
            command.add_argument("overrides", nargs="*", metavar="FILE | key=value",
                                 help="samples_<task>_<date>.jsonl files, and dotted overrides, e.g. output_dir=x")
        else:
            command.add_argument("overrides", nargs="*", metavar="key=value",
                                 help="dotted overrides applied on top of the file, e.g. output_dir=runs/x")
        if name == "evaluate":
            command.add_argument("--task", choices=list(EVALUATE_TASKS), help="shorthand for task=...")
        if name == "demo":
            command.add_argument("--preset", choices=["quick", "default"], help="shorthand for preset=...")
    return parser


def _resume_auto(argv: list[str]) -> list[str]:
    """`--resume auto` (or `--resume=auto`) → the internal flag, so that a bare `--resume` never takes the next
    word (an override such as output_dir=x) as its value."""
    result, skip = [], False
    for position, word in enumerate(argv):
        if skip:
            skip = False
            continue
        if word == "--resume=auto" or (word == "--resume" and argv[position + 1: position + 2] == ["auto"]):
            result.append("--resume-auto")
            skip = word == "--resume"
        else:
            result.append(word)
    return result


def _renamed(argv: list[str]) -> list[str]:
    """A command written under its old name runs under the new one, after a one-line notice; one written with
    underscores for its dashes (`calibration_report`, the module's spelling) runs silently, as pip accepts either."""
    for position, word in enumerate(argv):
        if word.startswith("-"):
            continue
        if word.replace("_", "-") in COMMANDS:
            return argv[:position] + [word.replace("_", "-")] + argv[position + 1:]
        if word in RENAMED_COMMANDS:
            print(f"lmrefinery: '{word}' is now '{RENAMED_COMMANDS[word]}'; the old name will be removed in the next "
                  f"release", file=sys.stderr)
            return argv[:position] + [RENAMED_COMMANDS[word]] + argv[position + 1:]
        return argv
    return argv


WRITE_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_resume_auto(_renamed(list(sys.argv[1:] if argv is None else argv))))
    configure_logging()
    overrides = list(args.overrides)
    if args.command in TAKES_FILES:
        files = [item for item in overrides if "=" not in item]
        overrides = [item for item in overrides if "=" in item] + ([f"samples={json.dumps(files)}"] if files else [])
    for flag in ("task", "preset"):
        if getattr(args, flag, None):
            overrides.append(f"{flag}={getattr(args, flag)}")
    finished = False
    try:
        config = load_config(config_class(args.command), args.config, overrides)
        if COMMANDS[args.command][1]:
            recipe(args.command).run(config, resume="auto" if args.resume_auto else args.resume)
        else:
            recipe(args.command).run(config)
        finished = True
    except UserError as exc:
        print(f"lmrefinery {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except TrainingDiverged as exc:
        print(f"lmrefinery {args.command}: training diverged: {exc}; the last complete checkpoint is kept",
              file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in WRITE_ERRORS:
            raise
        print(f"lmrefinery {args.command}: error: {exc.filename or 'a file'}: cannot write ({exc.strerror}); "
              f"outputs written before it are intact", file=sys.stderr)
        return UserError.exit_code
    finally:
        release_run_locks()
        teardown_distributed(every_rank_finished=finished)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
