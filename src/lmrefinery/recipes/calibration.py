"""`lmrefinery calibration FILE…`: the calibration report of lm-evaluation-harness multiple-choice results from the
samples files its `--log_samples` wrote; `evaluate --task lm-eval` writes the same report for the tasks it runs.

Per task and per scoring (acc, acc_norm): accuracy, ECE, equal-mass ECE, MCE, Brier, NLL, selective accuracy and
the coverage–accuracy AUC (evaluation/lm_eval_samples.py), and a reliability diagram in plots/.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from lmrefinery.config import CalibrationReportConfig, dump_config
from lmrefinery.errors import UserError
from lmrefinery.evaluation.calibration import reliability_diagram
from lmrefinery.evaluation.lm_eval_samples import SCORINGS, calibration_metrics, confidences_and_correct, read_samples
from lmrefinery.fileio import atomic_write_json, atomic_write_text, output_directory

log = logging.getLogger(__name__)

SAMPLES_NAME = re.compile(r"^samples_(?P<task>.+)_\d{4}-\d{2}-\d{2}T[\d\-.]+$")


def task_name(path: Path) -> str:
    """The task a samples file is for: lm-eval names them samples_<task>_<ISO date>.jsonl."""
    match = SAMPLES_NAME.match(Path(path).stem)
    return match["task"] if match else Path(path).stem


def calibration_report(samples_files: dict[str, Path], output_dir: Path, n_bins: int,
                       target_delimiter: str = " ") -> dict:
    """{task: {scoring: metrics}} for the given samples files; reliability diagrams written to output_dir/plots."""
    items_by_task = {task: read_samples(str(path), target_delimiter) for task, path in samples_files.items()}
    report = {}  # every file is read (and any bad one refused) before anything is written
    for task, items in items_by_task.items():
        report[task] = {"samples_file": str(samples_files[task])}
        for scoring in SCORINGS:
            report[task][scoring] = calibration_metrics(items, scoring, n_bins)
            confidence, correct = confidences_and_correct(items, scoring)
            reliability_diagram(confidence, correct, output_dir / "plots" / f"reliability-{task}-{scoring}.png",
                                n_bins, f"{task} ({scoring} scoring)")
    return report


def summary_lines(report: dict) -> dict:
    """What the commands print: per task and scoring, accuracy and the headline calibration figures."""
    return {task: {scoring: {key: round(values[scoring][key], 4) for key in ("accuracy", "ece", "equal_mass_ece",
                                                                              "brier", "nll")}
                   for scoring in SCORINGS} for task, values in report.items()}


def run(config: CalibrationReportConfig) -> Path:
    output_dir = output_directory(config.output_dir)
    files = {}
    for path in map(Path, config.samples):
        if not path.is_file():
            raise UserError(f"{path}: no such samples file (lm-eval writes samples_<task>_<date>.jsonl with "
                            f"--log_samples)")
        name = task_name(path)
        files[name if name not in files else path.stem] = path
    report = calibration_report(files, output_dir, config.n_bins, config.target_delimiter)
    atomic_write_json(output_dir / "calibration.json", {"n_bins": config.n_bins, "tasks": report})
    atomic_write_text(output_dir / "config.yaml", dump_config(config))
    print(json.dumps(summary_lines(report), indent=2))
    log.info("wrote %s and plots/reliability-*.png", output_dir / "calibration.json")
    return output_dir
