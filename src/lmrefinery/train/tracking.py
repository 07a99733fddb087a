"""Experiment tracking through the libraries people already watch runs in: TensorBoard (`torch.utils.tensorboard`)
and Weights & Biases (`wandb`). metrics.jsonl stays the source of truth: every record written there is mirrored,
on rank 0 only, as scalars (nested numbers flattened: `weights/<source>`), and the run's plots are logged as images
at the end.

W&B runs offline (its files under output_dir/wandb, to `wandb sync` later) unless WANDB_MODE says otherwise or the
user opted into the network (LMREFINERY_ONLINE=1); a resumed run continues the same W&B run.
"""

from __future__ import annotations

import hashlib
import numbers
import os
from pathlib import Path

import numpy as np

from lmrefinery.errors import UserError

TRACKERS = ("tensorboard", "wandb")


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics record, nested dicts flattened with '/' (booleans and text left out)."""
    flat = {}
    for key, value in record.items():
        if key in ("step", "time", "event"):
            continue
        if isinstance(value, dict):
            flat |= scalars(value, f"{prefix}{key}/")
        elif isinstance(value, numbers.Number) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


class Trackers:
    def __init__(self, kinds: list[str], output_dir: Path, name: str, config: dict, enabled: bool):
        self.tensorboard = self.wandb = None
        if not enabled or not kinds:
            return
        if "tensorboard" in kinds:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("report_to: tensorboard needs the package tensorboard (pip install tensorboard)") \
                    from None
            self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
        if "wandb" in kinds:
            try:
                import wandb
            except ImportError:
                raise UserError("report_to: wandb needs the package wandb (pip install wandb)") from None
            online = os.environ.get("LMREFINERY_ONLINE") not in (None, "", "0")
            mode = os.environ.get("WANDB_MODE") or ("online" if online else "offline")
            run_id = hashlib.sha256(str(output_dir.resolve()).encode()).hexdigest()[:16]  # the same run on resume
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "lmrefinery"), name=name,
                                    dir=str(output_dir), config=config, mode=mode, id=run_id, resume="allow")

    def log(self, record: dict) -> None:
        """A metrics.jsonl record (it has a `step`)."""
        values = scalars(record)
        if not values or "step" not in record:
            return
        prefix = "validation/" if record.get("event") == "validation" else ""
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(prefix + key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log({prefix + key: value for key, value in values.items()}, step=record["step"])

    def images(self, directory: Path) -> None:
        """Every PNG in `directory` (the run's plots), logged once at the end."""
        for path in sorted(Path(directory).glob("*.png")):
            if self.tensorboard is not None:
                import matplotlib.image

                pixels = matplotlib.image.imread(str(path))[..., :3]
                self.tensorboard.add_image(f"plots/{path.stem}", np.asarray(pixels), dataformats="HWC")
            if self.wandb is not None:
                import wandb

                self.wandb.log({f"plots/{path.stem}": wandb.Image(str(path))})

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
