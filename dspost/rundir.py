"""The run directory contract.

    output_dir/config.yaml           resolved recipe
    output_dir/metrics.jsonl         one object per step: {"step": N, "reward/mean": ..., ...}
    output_dir/tb/                   TensorBoard events
    output_dir/checkpoints/step_N/   Hugging Face layout (+ trainer_state.pt), written atomically
    output_dir/checkpoints/latest    a text file naming the newest complete step_N
    output_dir/plots/*.png           curves, at the end of a run and with `dspost plot RUN_DIR`
    output_dir/run.log               the log
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel


def default_output_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, root: str | os.PathLike, recipe: BaseModel | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "checkpoints").mkdir(exist_ok=True)
        if recipe is not None:
            write_text_atomic(self.root / "config.yaml",
                              yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        self.log = logging.getLogger(f"dspost.run.{self.root.resolve()}")
        self.log.setLevel(logging.INFO)
        self.log.propagate = False
        if not self.log.handlers:
            fh = logging.FileHandler(self.root / "run.log")
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self.log.addHandler(fh)
        self._tb = None

    # ---- metrics
    @property
    def tb(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.root / "tb"))
        return self._tb

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.root / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, drop rows of steps the restored checkpoint does not contain."""
        path = self.root / "metrics.jsonl"
        if path.exists():
            rows = [r for r in read_metrics(self.root) if r["step"] <= after_step]
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))

    def resumed(self, checkpoint: Path | None, step: int) -> None:
        if checkpoint is not None:
            self.truncate_metrics(step)
            self.log.info("resumed from %s at step %d", checkpoint, step)

    # ---- checkpoints
    def checkpoint_path(self, step: int) -> Path:
        return self.root / "checkpoints" / f"step_{step}"

    def mark_latest(self, step: int) -> None:
        write_text_atomic(self.root / "checkpoints" / "latest", f"step_{step}\n")

    def latest_checkpoint(self) -> Path | None:
        latest = self.root / "checkpoints" / "latest"
        if not latest.is_file():
            return None
        path = self.root / "checkpoints" / latest.read_text().strip()
        return path if path.is_dir() else None

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        from dspost.plots import plot_run

        plot_run(self.root)


def read_metrics(root: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(root) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v
