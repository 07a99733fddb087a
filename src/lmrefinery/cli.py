"""`lmrefinery <command> [--config FILE.yaml] [key=value ...] [--resume]`.

Each command is a recipe plus its config class. User errors exit 2 with one line; a diverged run exits 3.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmrefinery import __version__
from lmrefinery.config import load_config
from lmrefinery.errors import TrainingDiverged, UserError
from lmrefinery.logs import configure_logging
from lmrefinery.train.distributed import teardown_distributed

# command → (config class in lmrefinery.config, resumable with --resume, one-line help); the recipe is
# lmrefinery.recipes.<command>, imported only when it runs (a recipe resumes iff its run() takes `resume`).
COMMANDS = {
    "sft": ("SFTConfig", True, "fine-tune on one or several sources with a chosen sampling"),
    "reweight": ("ReweightConfig", True, "learn per-source data weights with ScaleBiO"),
    "mix": ("MixConfig", False, "draw an SFT set of N examples with learned weights"),
    "teacher": ("TeacherConfig", True, "cache a teacher's top-k token probabilities"),
    "calibrate": ("CalibrateConfig", False, "fit the teacher temperature that minimises ECE"),
    "distill": ("DistillConfig", True, "distil a student from the top-k cache (FIRST)"),
    "evaluate": ("EvaluateConfig", False, "held-out loss per source, or MCQ accuracy and calibration"),
    "demo": ("DemoConfig", False, "the whole story on the embedded default model and data"),
    "compare": ("CompareConfig", False, "the papers' baselines side by side under one budget"),
}


def config_class(command: str):
    return getattr(importlib.import_module("lmrefinery.config"), COMMANDS[command][0])


def recipe(command: str):
    return importlib.import_module(f"lmrefinery.recipes.{command}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmrefinery", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lmrefinery {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, resumable, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--config", help="YAML config file")
        if resumable:
            command.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
        command.add_argument("overrides", nargs="*", metavar="key=value",
                             help="dotted overrides applied on top of the file, e.g. output_dir=runs/x")
        if name == "evaluate":
            command.add_argument("--task", choices=["loss", "mcq", "exact_match"], help="shorthand for task=...")
        if name == "demo":
            command.add_argument("--preset", choices=["quick", "default"], help="shorthand for preset=...")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()
    overrides = list(args.overrides)
    for flag in ("task", "preset"):
        if getattr(args, flag, None):
            overrides.append(f"{flag}={getattr(args, flag)}")
    try:
        config = load_config(config_class(args.command), args.config, overrides)
        if COMMANDS[args.command][1]:
            recipe(args.command).run(config, resume=args.resume)
        else:
            recipe(args.command).run(config)
    except UserError as exc:
        print(f"lmrefinery {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except TrainingDiverged as exc:
        print(f"lmrefinery {args.command}: training diverged: {exc}; the last complete checkpoint is kept",
              file=sys.stderr)
        return exc.exit_code
    finally:
        teardown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
