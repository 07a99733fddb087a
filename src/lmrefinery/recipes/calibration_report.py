"""`lmrefinery calibration-report FILE…`: the calibration report of lm-evaluation-harness multiple-choice results
from the samples files its `--log_samples` wrote; `evaluate --task lm-eval` writes the same report for the tasks it
runs.

Per task and per scoring (acc, acc_norm): accuracy, ECE, equal-mass ECE, MCE, Brier, NLL, selective accuracy and
the coverage–accuracy AUC, and a reliability diagram in plots/ — computed by evaluation/lm_eval_samples.py, which
`evaluate --task lm-eval` uses too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lmrefinery.config import CalibrationReportConfig, dump_config
from lmrefinery.errors import UserError
from lmrefinery.evaluation.lm_eval_samples import calibration_report, summary_lines, task_name
from lmrefinery.fileio import atomic_write_json, atomic_write_text, output_directory

log = logging.getLogger(__name__)


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
