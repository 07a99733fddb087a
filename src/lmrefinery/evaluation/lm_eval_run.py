"""Running lm-evaluation-harness tasks on a model lmrefinery loaded, through lm-eval's Python API (`simple_evaluate`
with an `HFLM` wrapped around the loaded model), and saving lm-eval's own result and per-sample files.

A task is an lm-eval task name, or a task YAML file. A YAML is read with lm-eval's loader (so `include:` and
`!function` work) and its relative local data paths (`dataset_path`, `dataset_kwargs.data_files` / `data_dir`) are
resolved beside the YAML, so a task shipped with its data runs from any working directory, offline.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lmrefinery.errors import UserError

log = logging.getLogger(__name__)


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UserError("evaluate --task lm-eval needs lm-evaluation-harness (pip install 'lmrefinery[lm-eval]')") \
            from None
    return lm_eval


def _load_task_yaml(path: Path) -> dict:
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # lm-eval before 0.4.10
        from lm_eval.utils import load_yaml_config as legacy

        def load_yaml(path):
            return legacy(yaml_path=str(path), mode="full")
    try:
        return load_yaml(path)
    except (OSError, ValueError, ImportError, AttributeError) as exc:
        raise UserError(f"{path}: not a readable lm-eval task YAML ({exc})") from None
    except Exception as exc:  # a YAML syntax error, from whichever parser lm-eval uses
        if type(exc).__module__.startswith("yaml"):
            raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        raise


def _beside(value, directory: Path):
    """A relative path that exists beside the YAML, made absolute; anything else unchanged."""
    if isinstance(value, str) and value and not Path(value).is_absolute() and (directory / value).exists():
        return str((directory / value).resolve())
    if isinstance(value, list):
        return [_beside(item, directory) for item in value]
    if isinstance(value, dict):
        return {key: _beside(item, directory) for key, item in value.items()}
    return value


def task_spec(task: str):
    """What lm-eval's task manager receives for one configured task: the name, or a YAML's config dict."""
    path = Path(task)
    if path.suffix not in (".yaml", ".yml"):
        return task
    if not path.is_file():
        raise UserError(f"{task}: no such lm-eval task YAML")
    spec = _load_task_yaml(path)
    if "task" not in spec:
        raise UserError(f"{task}: an lm-eval task YAML needs a 'task' name")
    if spec.get("dataset_path") in ("json", "csv", "parquet", "text", "arrow"):  # a builder: its files are local
        kwargs = dict(spec.get("dataset_kwargs") or {})
        for key in ("data_files", "data_dir"):
            if key in kwargs:
                kwargs[key] = _beside(kwargs[key], path.parent)
        spec["dataset_kwargs"] = kwargs
    else:
        spec["dataset_path"] = _beside(spec.get("dataset_path"), path.parent)
    return spec


def run_tasks(model, tokenizer, tasks: list[str], directory: Path, *, batch_size: int, include_path: str | None,
              num_fewshot: int | None, limit: int | None, apply_chat_template: bool, seed: int) -> dict:
    """lm-eval's results for `tasks`; its results JSON and samples_<task>_<date>.jsonl files written to
    `directory`. Returns {"results": {task: {metric: value}}, "samples_files": {task: path},
    "output_types": {task: type}}."""
    lm_eval = _lm_eval()
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    specs = [task_spec(task) for task in tasks]
    manager = TaskManager(include_path=include_path)
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        results = lm_eval.simple_evaluate(
            model=wrapped, tasks=specs, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
            log_samples=True, apply_chat_template=apply_chat_template, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed)
    except KeyError as exc:  # an unknown task name
        raise UserError(f"lm-eval: {exc.args[0] if exc.args else exc}") from None
    except (FileNotFoundError, ConnectionError) as exc:
        raise UserError(f"lm-eval: a task's data is not available offline ({exc}); use a local task YAML "
                        f"(docs/evaluate.md) or LMREFINERY_ONLINE=1") from None
    directory.mkdir(parents=True, exist_ok=True)
    tracker = EvaluationTracker(output_path=str(directory / "results.json"))  # written as results_<date>.json
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in samples:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    files = {task: max(directory.glob(f"samples_{task}_*.jsonl"), key=lambda p: p.stat().st_mtime)
             for task in samples}
    return {"results": results["results"], "samples_files": files,
            "output_types": {task: config.get("output_type") for task, config in results["configs"].items()}}
