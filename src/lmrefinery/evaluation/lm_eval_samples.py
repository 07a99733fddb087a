"""Calibration of lm-evaluation-harness multiple-choice results, from the per-sample log lm-eval writes with
`--log_samples` (samples_<task>_<date>.jsonl): each line holds the document's per-option log-likelihoods
(`filtered_resps`: [log-likelihood, is_greedy] per option, as strings), the continuations scored (`arguments`),
the target and lm-eval's own per-sample `acc` / `acc_norm`.

The option probabilities follow lm-eval's two scorings, so that the argmax of the probabilities is lm-eval's
prediction and the accuracy equals lm-eval's:
- `acc`: p = softmax(log-likelihoods);
- `acc_norm`: p = softmax(log-likelihood / characters of the choice) — lm-eval ranks options by that ratio; the
  softmax over it is the distribution whose calibration we report for that scoring.
Every item is checked against the `acc` / `acc_norm` lm-eval recorded for it; a file that disagrees is not one we can
read correctly and is refused.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import softmax

from lmrefinery.data.files import BadRecord, read_records
from lmrefinery.errors import UserError
from lmrefinery.evaluation.calibration import (adaptive_calibration_error, brier_score, coverage_accuracy_auc,
                                               expected_calibration_error, maximum_calibration_error,
                                               negative_log_likelihood, reliability_diagram, selective_accuracy)

SCORINGS = ("acc", "acc_norm")
COVERAGES = (0.5, 0.8)


@dataclass
class ScoredItem:
    location: str
    loglikelihoods: np.ndarray  # one per option
    lengths: np.ndarray  # characters of each choice: what acc_norm divides by
    gold: int
    recorded: dict = field(default_factory=dict)  # lm-eval's own per-sample acc / acc_norm

    def probabilities(self, scoring: str) -> np.ndarray:
        scores = self.loglikelihoods if scoring == "acc" else self.loglikelihoods / self.lengths
        return softmax(scores)


def _number(value, location: str, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BadRecord(location, f"{what} must be a number, got {value!r}") from None


def _option_loglikelihoods(fields: dict, location: str) -> np.ndarray:
    responses = fields.get("filtered_resps")
    if not isinstance(responses, list) or len(responses) < 2:
        raise BadRecord(location, "expected 'filtered_resps' with one [log-likelihood, is_greedy] per option "
                                  "(a multiple_choice task's --log_samples output)")
    values = []
    for response in responses:
        first = response[0] if isinstance(response, (list, tuple)) and response else response
        values.append(_number(first, location, "a log-likelihood in 'filtered_resps'"))
    return np.asarray(values, dtype=np.float64)


def _continuations(fields: dict, location: str, count: int) -> list[str]:
    arguments = fields.get("arguments")
    if isinstance(arguments, dict):  # lm-eval's file form: {"gen_args_0": {"arg_0": context, "arg_1": continuation}}
        arguments = [list(value.values()) if isinstance(value, dict) else value for value in arguments.values()]
    if not isinstance(arguments, list) or len(arguments) != count:
        raise BadRecord(location, f"expected 'arguments' with one (context, continuation) per option ({count})")
    continuations = []
    for argument in arguments:
        if not isinstance(argument, (list, tuple)) or len(argument) < 2 or not isinstance(argument[1], str):
            raise BadRecord(location, "each entry of 'arguments' must hold a context and a continuation string")
        continuations.append(argument[1])
    return continuations


def _gold_candidates(target, choices: list[str]) -> list[int]:
    """The option indices a logged target can mean: lm-eval writes str(target), where the target was an index or
    the text of a choice."""
    text = str(target)
    candidates = []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        candidates.append(value)
    for index, choice in enumerate(choices):
        if choice == text or choice.strip() == text.strip():
            candidates.append(index)
    return list(dict.fromkeys(candidates))


def parse_sample(fields: object, location: str, target_delimiter: str = " ") -> ScoredItem:
    if not isinstance(fields, dict):
        raise BadRecord(location, "expected an lm-eval sample object")
    loglikelihoods = _option_loglikelihoods(fields, location)
    continuations = _continuations(fields, location, len(loglikelihoods))
    choices = [c[len(target_delimiter):] if target_delimiter and c.startswith(target_delimiter) else c
               for c in continuations]
    lengths = np.asarray([max(len(c), 1) for c in choices], dtype=np.float64)
    recorded = {s: _number(fields[s], location, f"'{s}'") for s in SCORINGS if s in fields}
    candidates = _gold_candidates(fields.get("target"), choices)
    if not candidates:
        raise BadRecord(location, f"target {fields.get('target')!r} is neither an option index nor one of the "
                                  f"choices {choices} (several gold answers are not supported)")
    for gold in candidates:  # the reading of the target under which our predictions reproduce lm-eval's scores
        item = ScoredItem(location, loglikelihoods, lengths, gold, recorded)
        if all(float(np.argmax(item.probabilities(s)) == gold) == value for s, value in recorded.items()):
            return item
    raise BadRecord(location, f"lm-eval's recorded {recorded} cannot be reproduced from the log-likelihoods with "
                              f"target_delimiter {target_delimiter!r}: is the delimiter right?")


def read_samples(path: str, target_delimiter: str = " ") -> list[ScoredItem]:
    """A samples_*.jsonl file as scored items; a record we cannot use is a UserError naming file and line."""
    items = []
    for record in read_records(path):
        try:
            if isinstance(record, BadRecord):
                raise record
            items.append(parse_sample(record.fields, record.location, target_delimiter))
        except BadRecord as bad:
            raise UserError(f"{bad.location}: {bad.problem}") from None
    if not items:
        raise UserError(f"{path}: no samples")
    return items


def confidences_and_correct(items: list[ScoredItem], scoring: str) -> tuple[np.ndarray, np.ndarray]:
    """Per item: the top option probability and whether that option is the gold one."""
    probabilities = [item.probabilities(scoring) for item in items]
    return (np.asarray([p.max() for p in probabilities]),
            np.asarray([float(np.argmax(p) == item.gold) for p, item in zip(probabilities, items)]))


def calibration_metrics(items: list[ScoredItem], scoring: str, n_bins: int = 10) -> dict:
    """Accuracy and calibration of one scoring: ECE (equal width), equal-mass ECE, MCE, Brier over the options, NLL
    of the gold option, selective accuracy at 50% and 80% coverage, the area under the coverage–accuracy curve."""
    confidence, correct = confidences_and_correct(items, scoring)
    probabilities = [item.probabilities(scoring) for item in items]
    widest = max(len(p) for p in probabilities)
    padded = np.asarray([np.pad(p, (0, widest - len(p))) for p in probabilities])
    return {"items": len(items), "accuracy": float(correct.mean()),
            "ece": expected_calibration_error(confidence, correct, n_bins),
            "equal_mass_ece": adaptive_calibration_error(confidence, correct, n_bins),
            "mce": maximum_calibration_error(confidence, correct, n_bins),
            "brier": brier_score(padded, [item.gold for item in items]),
            "nll": negative_log_likelihood([p[item.gold] for p, item in zip(probabilities, items)]),
            "mean_confidence": float(confidence.mean()),
            **{f"selective_accuracy@{c:g}": selective_accuracy(confidence, correct, c) for c in COVERAGES},
            "coverage_accuracy_auc": coverage_accuracy_auc(confidence, correct)}


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
