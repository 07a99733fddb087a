"""`lmrefinery evaluate --task loss`: token-mean loss and perplexity on a dataset, overall and per source."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm.auto import tqdm

from lmrefinery.config import EvaluateConfig, dump_config
from lmrefinery.evaluation.loss import evaluate_loss
from lmrefinery.fileio import atomic_write_json, atomic_write_text
from lmrefinery.models import load_model
from lmrefinery.recipes.common import load_data
from lmrefinery.train.checkpoint import seed_everything
from lmrefinery.train.distributed import setup_distributed, shard_model

log = logging.getLogger(__name__)


def run(config: EvaluateConfig, resume: bool = False) -> Path:
    env = setup_distributed()
    seed_everything(config.seed, env.rank)
    tokenizer, pool, _ = load_data(config.model, config.data)
    model = shard_model(load_model(config.model, env.device), env)
    batches = -(-len(pool.examples) // (config.batch_size * env.world_size))
    progress = tqdm(total=batches, desc="evaluate", disable=not env.is_main, dynamic_ncols=True)
    result = evaluate_loss(model, pool, env, config.batch_size, config.model.precision, tokenizer.pad_token_id,
                           progress)
    progress.close()
    output_dir = Path(config.output_dir)
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        report = {"task": "loss", "model": config.model.name_or_path, "sources": pool.names, **result}
        atomic_write_json(output_dir / "eval.json", report)
        atomic_write_text(output_dir / "config.yaml", dump_config(config))
        print(json.dumps({"overall": result["overall"],
                          "per_source": {k: v["loss"] for k, v in result["per_source"].items()}}, indent=2))
        log.info("wrote %s", output_dir / "eval.json")
    return output_dir
