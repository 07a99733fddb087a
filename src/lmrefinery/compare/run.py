"""`lmrefinery compare`: the papers' baselines side by side, under one budget, on one test, over several seeds.

Mixture / selection (mixture.py): each method makes an SFT set within one token budget from the same pool,
then one pass of the same SFT settings over it; scored on the target's test set (per-example loss, exact match).
Distillation (distillation.py): the same student init, steps, batch and learning rate for every student;
scored on in-domain and out-of-domain multiple-choice tests (accuracy, ECE, NLL, Brier).

Every method runs once per seed, each run in its own fresh process (its wall time and peak memory are its own); its
result.json is the unit of resume, so an interrupted comparison continues with the next (method, seed). Stages that
several methods need (teacher fine-tuning, teacher caches, calibration) run once, in this process. The report
(report.py, statistics.py) pools seeds × test items: means with 95% bootstrap CIs and paired differences against the
reference method (the first listed: uniform, sft).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import yaml

from lmrefinery.compare import data, distillation, mixture
from lmrefinery.compare.report import write_report
from lmrefinery.config import CompareConfig, dump_config, validate_config
from lmrefinery.environment import describe
from lmrefinery.errors import UserError
from lmrefinery.fileio import atomic_write_json, atomic_write_text
from lmrefinery.logs import configure_logging
from lmrefinery.train.distributed import default_device
from lmrefinery.train.precision import peak_memory_bytes

log = logging.getLogger(__name__)


def _in_child(function, *args) -> dict:
    """Runs in the method's own process: the result plus the process's wall time and peak memory."""
    configure_logging()
    start = time.perf_counter()
    result = function(*args)
    used = default_device()
    result.update(wall_s=time.perf_counter() - start, peak_memory_bytes=peak_memory_bytes(used),
                  peak_memory_kind="accelerator allocated" if used.type == "cuda" else "process resident set")
    return result


def _in_this_process(function, *args) -> dict:
    """Runs the method here, after the ones before it: the wall time, but no peak memory of its own (the process's
    peak is that of every method so far)."""
    start = time.perf_counter()
    result = function(*args)
    _release_accelerator_memory()  # the method's models are garbage now: free them before the next one loads
    result.update(wall_s=time.perf_counter() - start, peak_memory_bytes=None,
                  peak_memory_kind="not measured: the methods shared one process")
    return result


def run_method(directory: Path, function, *args, isolate: bool = True) -> dict:
    """A method's result for one seed: read from result.json when complete, else computed (in a fresh process) and
    written."""
    done = directory / "result.json"
    if done.exists():
        log.info("%s: already complete", directory)
        return json.loads(done.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    log.info("%s: running", directory)
    if isolate:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            result = pool.submit(_in_child, function, *args).result()
    else:
        result = _in_this_process(function, *args)
    # each unit says where it ran: a resumed comparison's units may come from different machines
    result["environment"] = describe()
    atomic_write_json(done, result)
    return result


def run_order(requested: list[str], depends_on) -> list[str]:
    """The methods to run: the requested ones, each preceded by the methods whose finished runs it reads
    (`depends_on(name)`, recursively) when those were not requested themselves."""
    order: list[str] = []

    def add(name: str) -> None:
        if name not in order:
            if (needed := depends_on(name)) is not None:
                add(needed)
            order.append(name)

    for name in requested:
        add(name)
    return order


def _mixture(config: CompareConfig, out: Path, isolate: bool) -> dict:
    order = run_order(config.mixture.methods, mixture.depends_on)
    results = {name: {} for name in order}
    for seed in config.seeds:
        for name in order:
            directory = out / name / f"seed-{seed}"
            inputs = [str(out / needed / f"seed-{seed}")] if (needed := mixture.depends_on(name)) else []
            results[name][seed] = run_method(directory, mixture.METHODS[name], config, seed, str(directory), *inputs,
                                             isolate=isolate)
    return {name: results[name] for name in config.mixture.methods}


def _release_accelerator_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _distillation(config: CompareConfig, out: Path, isolate: bool) -> tuple[dict, dict]:
    shared_path = out / "shared.json"
    if shared_path.exists():
        shared = json.loads(shared_path.read_text())
    else:
        shared = distillation.shared_stages(config, out)
        shared["environment"] = describe()
        atomic_write_json(shared_path, shared)
        _release_accelerator_memory()  # the methods run in their own processes: leave them the whole device
    requested = config.distillation.methods
    order = run_order(requested, distillation.DEPENDS_ON.get)
    results = {name: {} for name in order}
    for seed in config.seeds:
        for name in order:
            directory = out / name / f"seed-{seed}"
            inputs = [results[needed][seed]["model"]] if (needed := distillation.DEPENDS_ON.get(name)) else []
            results[name][seed] = run_method(directory, distillation.METHODS[name], config, seed, shared,
                                             str(directory), *inputs, isolate=isolate)
    return {name: results[name] for name in requested}, shared


def _same_settings(previous: str, resolved: str) -> bool:
    """The config a comparison ran under equals this one — also when a later version added settings whose defaults
    are what ran (the old file, read now, fills them in), so finished methods survive an upgrade."""
    if previous == resolved:
        return True
    try:
        return dump_config(validate_config(CompareConfig, yaml.safe_load(previous))) == resolved
    except (UserError, yaml.YAMLError):
        return False


def run(config: CompareConfig, isolate: bool = True) -> Path:
    """Each (method, seed) runs in a fresh process, so that its wall time and peak memory are its own.
    `isolate=False` runs them all in this process: no per-method peak memory, but no process start and imports per
    method either (≈ 9 s each on 2 CPU cores) — the demo's choice, and the orchestration tests'."""
    if config.train.steps is None:
        raise UserError("compare: train.steps is required (every method gets the same number of optimizer steps)")
    out = Path(config.output_dir)
    resolved = dump_config(config)
    previous = out / "config.yaml"
    if previous.exists() and not _same_settings(previous.read_text(), resolved):
        # finished methods are read back, not rerun: they must have been measured under this very config
        raise UserError(f"{previous}: {out} holds a comparison run with a different config; give a new "
                        f"output_dir (or delete it)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(previous, resolved)
    started = time.perf_counter()
    experiment = config.experiment_data()
    if experiment is not None:
        paths = data.build(out / "data", experiment, config.data_seed)
        config = data.fill_compare_paths(config, experiment, paths)
    results = {"mixture": None, "distillation": None, "shared": None}
    if config.mixture is not None:
        results["mixture"] = _mixture(config, out / "mixture", isolate)
    if config.distillation is not None:
        results["distillation"], results["shared"] = _distillation(config, out / "distillation", isolate)
    report = write_report(out, config, results, wall_s=time.perf_counter() - started, isolated=isolate)
    print(report)
    return out
