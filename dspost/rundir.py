"""The run directory contract.

    output_dir/config.yaml           resolved recipe
    output_dir/metrics.jsonl         one object per step: {"step": N, "reward/mean": ..., ...}
    output_dir/tb/                   TensorBoard events
    output_dir/checkpoints/step_N/   Hugging Face layout (+ trainer_state.pt), written atomically
    output_dir/checkpoints/latest    a text file naming the newest complete step_N
    output_dir/plots/*.png           curves, at the end of a run and with `dspost plot RUN_DIR`
    output_dir/run.log               the log
    output_dir/stage.json            the runner's record: start, final output, finished, wall seconds per attempt

Opening a run directory with its recipe decides how the run starts, and loses nothing silently: with
`resume: true` it continues from `checkpoints/latest` (a `latest` naming a missing directory is an error, a
directory without `latest` starts from step 0) after checking the recipe against the stored `config.yaml`,
and drops the metrics rows the restored checkpoint does not contain; without `resume` it refuses a directory
that already holds a checkpoint. Temporaries of killed writers are removed when it is opened.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from dspost.config import StageRecipe


class RunDirError(ValueError):
    """A run directory that cannot be used as asked; the message is one line naming the file and the fix."""


# Recipe fields a resumed run may change; every other difference from the stored config.yaml is refused,
# because the checkpoint, the data order and the metrics so far were produced under the stored values.
RESUMABLE_FIELDS: tuple[str, ...] = (
    "resume",  # the switch itself
    "name", "output_dir",  # labels and where the directory is (it may have been moved)
    # How long the run goes (`--max-steps` extends it; the steps done are unchanged, the schedule of the rest
    # follows the new length, as if it had been planned so) and how often it evaluates and saves (capped by
    # `--max-steps`): neither changes what a step computes.
    "trainer.max_steps", "trainer.eval_every", "trainer.save_every", "sync.parity_every",
    # Where and on how many threads the same computation runs: cluster, placement, threads, memory, scorers.
    "ray", "*.num_threads", "*.num_cpus_per_worker", "*.num_gpus_per_worker", "*.resources",
    "rewards.num_workers", "rollout.memory_fraction", "rollout.kv_cache_gb", "trainer.compile",
)
_LATEST_RE = re.compile(r"^step_\d+$")


def default_output_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` atomically and durably (fsynced file and directory)."""
    from dspost.model.checkpoint import write_file_atomic

    write_file_atomic(path, text)


class RunDir:
    def __init__(self, root: str | os.PathLike, recipe: StageRecipe | None = None):
        """Open (or create) the run directory `root`; with `recipe`, prepare it for that recipe's run: the
        checkpoint to resume from (`resume_from`), the recipe checked and stored, the metrics cut back to it."""
        from dspost.model.checkpoint import clean_stale_temporaries

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "checkpoints").mkdir(exist_ok=True)
        self.log = logging.getLogger(f"dspost.run.{self.root.resolve()}")
        self.log.setLevel(logging.INFO)
        self.log.propagate = False
        if not self.log.handlers:
            fh = logging.FileHandler(self.root / "run.log")
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self.log.addHandler(fh)
        self._tb = None
        for where in (self.root, self.root / "checkpoints"):
            removed = clean_stale_temporaries(where)
            if removed:
                self.log.info("removed what killed writers left in %s: %s", where, ", ".join(removed))
        self.resume_from: Path | None = None
        if recipe is not None:
            self.resume_from = self._prepare(recipe)

    def _prepare(self, recipe: StageRecipe) -> Path | None:
        config = self.root / "config.yaml"
        resolved = recipe.model_dump(mode="json")
        latest = self.root / "checkpoints" / "latest"
        resume = bool(getattr(recipe, "resume", False))
        if not resume and latest.is_file():
            raise RunDirError(f"{self.root}: already holds a run ({latest} names {latest.read_text().strip()!r}); "
                              "set resume=true to continue it, or choose another output_dir")
        checkpoint = self.latest_checkpoint() if resume else None
        if checkpoint is not None and config.is_file():
            check_resumable(config, resolved)
        write_text_atomic(config, yaml.safe_dump(resolved, sort_keys=False))
        self.truncate_metrics(int(checkpoint.name.split("_")[1]) if checkpoint is not None else -1)
        return checkpoint

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
        """Keep the rows of steps up to `after_step` (the restored checkpoint's; -1 when the run starts afresh),
        and drop a last line torn by a kill mid-write, so the rows appended next follow on a line of their own."""
        path = self.root / "metrics.jsonl"
        if not path.exists():
            return
        text = path.read_text()
        rows = parse_metrics(text, path)
        kept = [r for r in rows if r["step"] <= after_step]
        out = "".join(json.dumps(r) + "\n" for r in kept)
        if out != text:
            write_text_atomic(path, out)
            torn = " and a torn last line" if len([ln for ln in text.splitlines() if ln.strip()]) > len(rows) else ""
            if after_step < 0:
                self.log.info("metrics.jsonl: dropped the %d rows%s of an attempt that saved no checkpoint",
                              len(rows), torn)
            else:
                self.log.info("metrics.jsonl: kept the %d rows up to step %d, dropped %d later ones%s", len(kept),
                              after_step, len(rows) - len(kept), torn)

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
        """The checkpoint `checkpoints/latest` names; None without `latest`. A `latest` naming something else
        than an existing `step_N` directory is an error: restarting from step 0 would lose the run silently."""
        latest = self.root / "checkpoints" / "latest"
        if not latest.is_file():
            return None
        name = latest.read_text().strip()
        if not _LATEST_RE.match(name):
            raise RunDirError(f"{latest}: expected the name of a checkpoint directory (step_N), got {name[:60]!r}")
        path = self.root / "checkpoints" / name
        if not path.is_dir():
            raise RunDirError(f"{latest} names {name}, but {path} does not exist: restore it, or point latest at "
                              "an existing step_N directory (or delete latest to start again from step 0)")
        return path

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def check_resumable(config: Path, resolved: dict[str, Any]) -> None:
    """Refuse resuming under a recipe that differs from the stored `config` in a field outside
    `RESUMABLE_FIELDS` (one line: the first such field, its stored and its new value)."""
    try:
        stored = yaml.safe_load(config.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunDirError(f"{config}: not readable YAML ({str(e).splitlines()[0]}); cannot check the recipe "
                          "of the run to resume") from None
    diff = first_difference(stored, resolved)
    if diff is not None:
        field, old, new = diff
        raise RunDirError(f"{config}: resume=true, but the recipe changed {field} from {old} to {new}; a resumed "
                          "run keeps its recipe (only its length, cadence and placement may change): use a "
                          "new output_dir to train with it")


_ABSENT = object()


def first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, str, str] | None:
    """(dotted field, old value, new value) of the first difference outside `RESUMABLE_FIELDS`, in document
    order; None when there is none. A field only one side has counts as a difference (its value `<absent>`)."""
    if prefix and any(fnmatch.fnmatchcase(prefix, pat) for pat in RESUMABLE_FIELDS):
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*new, *(k for k in old if k not in new)]:
            found = first_difference(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{prefix}{key}" if not prefix
                                     else f"{prefix}.{key}")
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = first_difference(a, b, f"{prefix}.{i}")
            if found:
                return found
        return None
    if old == new and type(old) is type(new):
        return None
    return prefix or "<recipe>", _show(old), _show(new)


def _show(v: Any) -> str:
    text = "<absent>" if v is _ABSENT else json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def read_metrics(root: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of `root/metrics.jsonl` (a last line torn by a kill mid-write is left out)."""
    path = Path(root) / "metrics.jsonl"
    if not path.is_file():
        return []
    return parse_metrics(path.read_text(), path)


def parse_metrics(text: str, path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl `text`. Only the last line may be malformed: a run killed while appending leaves
    a torn one, which is dropped; a malformed line before it is an error naming the file and the line."""
    lines = text.splitlines()
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                break
            raise RunDirError(f"{path}:{i + 1}: not a JSON object ({e.msg}); fix or delete that line") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise RunDirError(f"{path}:{i + 1}: expected an object with an integer \"step\", got {line[:60]!r}")
        rows.append(row)
    return rows


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v


STAGE_RECORD = "stage.json"


class StageRecord:
    """`stage.json`: what the runner knows of a stage across its attempts, so that a resumed pipeline still knows it.

        {"name", "kind", "inputs": {...}, "final": path | null, "finished": bool,
         "attempts": [{"started": ISO time, "seconds": wall seconds}], "seconds": their sum}

    `inputs`: what the stage started from (`start`: a model stage's checkpoint; an evaluation: its checkpoints).
    An attempt's seconds are written at every step (at most once a second) and at its end, so an attempt that was
    killed counts up to its last step; a stage skipped as finished adds no attempt."""

    def __init__(self, root: str | os.PathLike, data: dict[str, Any]):
        self.path, self.data = Path(root) / STAGE_RECORD, data
        self._t0 = self._saved = None

    @classmethod
    def read(cls, root: str | os.PathLike) -> StageRecord | None:
        path = Path(root) / STAGE_RECORD
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RunDirError(f"{path}: unreadable ({e}); delete it to run the stage again") from None
        return cls(root, data)

    @classmethod
    def begin(cls, root: str | os.PathLike, name: str, kind: str, inputs: dict[str, Any], resume: bool) -> StageRecord:
        """A new attempt: appended to the record's attempts when resuming, else the record starts afresh."""
        record = cls.read(root) if resume else None
        attempts = record.data.get("attempts", []) if record is not None else []
        record = cls(root, {"name": name, "kind": kind, "inputs": inputs, "final": None, "finished": False,
                            "attempts": attempts + [{"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": 0.0}]})
        record._t0 = time.monotonic()
        record.save()
        return record

    @property
    def finished(self) -> bool:
        return bool(self.data.get("finished"))

    @property
    def final(self) -> Path | None:
        return Path(self.data["final"]) if self.data.get("final") else None

    @property
    def inputs(self) -> dict[str, Any]:
        return self.data.get("inputs") or {}

    @property
    def seconds(self) -> float:
        return float(sum(a.get("seconds", 0.0) for a in self.data.get("attempts", [])))

    def tick(self, *_, force: bool = False) -> None:
        """The running attempt's seconds so far, saved at most once a second unless `force`."""
        now = time.monotonic()
        self.data["attempts"][-1]["seconds"] = round(now - self._t0, 3)
        if force or self._saved is None or now - self._saved >= 1.0:
            self.save()

    def finish(self, final: Path) -> None:
        self.data["final"], self.data["finished"] = str(final), True
        self.tick(force=True)

    def save(self) -> None:
        self._saved = time.monotonic()
        self.data["seconds"] = round(self.seconds, 3)
        write_text_atomic(self.path, json.dumps(self.data, indent=1) + "\n")
