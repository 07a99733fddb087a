"""`lmrefinery <command> [--config FILE.yaml] [key=value ...] [--resume]`.

Each command is a recipe plus its config class. User errors exit 2 with one line; a diverged run exits 3.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from lmrefinery import __version__
from lmrefinery.errors import TrainingDiverged, UserError

# command → (recipe module, config class: a name in lmrefinery.config or a dotted path, one-line help)
COMMANDS = {
    "sft": ("lmrefinery.recipes.sft", "SFTConfig", "fine-tune on one or several sources with a chosen sampling"),
    "reweight": ("lmrefinery.recipes.reweight", "ReweightConfig", "learn per-source data weights with ScaleBiO"),
    "mix": ("lmrefinery.recipes.mix", "MixConfig", "draw an SFT set of N examples with learned weights"),
    "teacher": ("lmrefinery.recipes.teacher", "TeacherConfig", "cache a teacher's top-k token probabilities"),
    "calibrate": ("lmrefinery.recipes.calibrate", "CalibrateConfig", "fit the teacher temperature that minimises ECE"),
    "distill": ("lmrefinery.recipes.distill", "DistillConfig", "distil a student from the top-k cache (FIRST)"),
    "evaluate": ("lmrefinery.recipes.evaluate", "EvaluateConfig", "held-out loss per source, or MCQ accuracy and calibration"),
    "demo": ("lmrefinery.recipes.demo", "DemoConfig", "the whole story on the embedded default model and data"),
    "compare": ("lmrefinery.recipes.compare", "lmrefinery.compare_config.CompareConfig", "the papers' baselines side by side under one budget"),
}


def config_class(command: str) -> type:
    location = COMMANDS[command][1]
    module_name, _, class_name = location.rpartition(".")
    return getattr(importlib.import_module(module_name or "lmrefinery.config"), class_name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmrefinery", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lmrefinery {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, _, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--config", help="YAML config file")
        command.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
        command.add_argument("overrides", nargs="*", metavar="key=value",
                             help="dotted overrides applied on top of the file, e.g. train.lr=1e-4")
        if name == "evaluate":
            command.add_argument("--task", choices=["loss", "mcq", "exact_match"], help="shorthand for task=...")
        if name == "demo":
            command.add_argument("--preset", choices=["quick", "default"], help="shorthand for preset=...")
    return parser


def configure_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()
    from lmrefinery.config import load_config

    module_name, _, _ = COMMANDS[args.command]
    overrides = list(args.overrides)
    for flag in ("task", "preset"):
        if getattr(args, flag, None):
            overrides.append(f"{flag}={getattr(args, flag)}")
    try:
        config = load_config(config_class(args.command), args.config, overrides)
        importlib.import_module(module_name).run(config, resume=args.resume)
    except UserError as exc:
        print(f"lmrefinery {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except TrainingDiverged as exc:
        print(f"lmrefinery {args.command}: training diverged: {exc}; the last complete checkpoint is kept",
              file=sys.stderr)
        return exc.exit_code
    finally:
        from lmrefinery.train.distributed import teardown_distributed

        teardown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
