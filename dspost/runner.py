"""Run a validated recipe: one stage, or a pipeline whose stages feed later ones.

Every stage records itself in its run directory (`stage.json`: what it started from, its final output, its wall
seconds per attempt). With `resume=true` (a pipeline's applies to all its stages) a stage found finished is
skipped: its record says finished, its recipe matches the stored `config.yaml`, a training stage's
`checkpoints/latest` names the step of its `trainer.max_steps`, and it started from the same checkpoint. Any
other stage runs, resuming from its own latest checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dspost.config import (EvalRMRecipe, EvaluateRecipe, GRPORecipe, ModelSection, OPDRecipe, PipelineRecipe, Recipe,
                           RMRecipe, SFTRecipe, StageRecipe)
from dspost.plots import plot_run
from dspost.recipe import stages_of
from dspost.rundir import RunDir, RunDirError, StageRecord, check_resumable, default_output_dir


class Progress:
    """A tqdm bar with rate and ETA and the numbers a user watches. RL stages (a row with `reward/` or `opd/`
    metrics): `reward` (mean reward of the batch), `acc` (the batch's accuracy), `eval_acc` (held-out accuracy),
    `kl` (OPD's reverse KL to the teacher, or the KL to the reference model) and `entropy` (the policy's); not the
    policy loss, which says nothing of progress (GSPO's is ~0 on-policy by construction). SFT and reward models:
    `loss`, `acc`, `eval_loss`, `eval_acc`. A value stays shown until its metric is logged again, so the last
    evaluation's stays between evaluations."""

    # (shown name, metrics it shows, the first one logged wins)
    RL = (("reward", ("reward/mean",)), ("acc", ("accuracy", "train/accuracy")), ("eval_acc", ("eval/accuracy",)),
          ("kl", ("opd/reverse_kl", "train/kl")), ("entropy", ("train/entropy", "entropy")))
    SUPERVISED = (("loss", ("train/loss",)), ("acc", ("train/accuracy",)), ("eval_loss", ("eval/loss",)),
                  ("eval_acc", ("eval/accuracy",)))

    def __init__(self, desc: str, on_step: Callable[[int], None] | None = None):
        self.desc, self.bar, self.fields, self.shown, self.on_step = desc, None, None, {}, on_step

    def __call__(self, step: int, total: int, metrics: dict) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, initial=step - 1, desc=self.desc, unit="step", dynamic_ncols=True)
        rl = any(k.startswith(("reward/", "opd/")) for k in metrics)
        if rl or self.fields is None:
            self.fields = self.RL if rl else self.SUPERVISED
        for name, keys in self.fields:
            value = next((metrics[k] for k in keys if isinstance(metrics.get(k), (int, float))), None)
            if value is not None:
                self.shown[name] = f"{value:.3g}"
        self.bar.set_postfix({name: self.shown[name] for name, _ in self.fields if name in self.shown}, refresh=False)
        self.bar.update(step - self.bar.n)
        if self.on_step is not None:
            self.on_step(step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _sft(stage: SFTRecipe, run: RunDir, model_path: Path, progress: Progress) -> Path:
    from dspost.sft import run_sft

    return run_sft(stage, run, model_path, progress)


def _grpo(stage: GRPORecipe, run: RunDir, model_path: Path, progress: Progress) -> Path:
    from dspost.grpo import run_grpo

    return run_grpo(stage, run, model_path, progress)


def _opd(stage: OPDRecipe, run: RunDir, model_path: Path, progress: Progress) -> Path:
    from dspost.opd import run_opd

    return run_opd(stage, run, model_path, progress)


def _rm(stage: RMRecipe, run: RunDir, model_path: Path, progress: Progress) -> Path:
    from dspost.rm import run_rm

    return run_rm(stage, run, model_path, progress)


def _eval_rm(stage: EvalRMRecipe, run: RunDir, model_path: Path | None, progress: Progress) -> Path:
    from dspost.eval_rm import run_eval_rm

    return run_eval_rm(stage, run, model_path, progress)


def _evaluate(stage: EvaluateRecipe, run: RunDir, pipeline: PipelineState, progress: Progress) -> Path:
    from dspost.evaluate import run_evaluate

    return run_evaluate(stage, run, pipeline, progress)


STAGE_RUNNERS: dict[str, Callable[[StageRecipe, RunDir, object, Progress], Path]] = {
    "sft": _sft, "grpo": _grpo, "opd": _opd, "rm": _rm, "eval_rm": _eval_rm, "evaluate": _evaluate}
"""Stage kind -> runner(stage, run directory, source, progress) -> the stage's output. `source` is the checkpoint a
stage with a `model` section starts from, the `PipelineState` for `evaluate` (`NEEDS_PIPELINE`), else None."""
NEEDS_PIPELINE = ("evaluate",)


@dataclass
class PipelineState:
    """What the stages run so far left, for later stages: in order, each stage's recipe, its output and (stages with
    a model) the checkpoint it started from. `root` is the pipeline's output_dir (None for a single stage)."""

    root: Path | None = None
    stages: dict[str, StageRecipe] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    starts: dict[str, Path] = field(default_factory=dict)

    def add(self, name: str, stage: StageRecipe, output: Path, start: Path | None) -> None:
        self.stages[name], self.outputs[name] = stage, output
        if start is not None:
            self.starts[name] = start


def run_stage(stage: StageRecipe, pipeline: PipelineState | None = None, log=print) -> Path:
    """Run one stage into its run directory (or skip it, when resuming, if it is finished); return its output."""
    pipeline = pipeline if pipeline is not None else PipelineState()
    name = stage.name or stage.kind
    runner = STAGE_RUNNERS[stage.kind]  # `check_runnable` refused other kinds when the recipe was loaded
    if stage.output_dir is None:
        stage.output_dir = str(default_output_dir(name))
    for teacher in getattr(stage, "teachers", None) or []:  # OPD: a teacher named by stage is its final checkpoint
        if teacher.from_stage and not teacher.path:
            teacher.path = str(pipeline.outputs[teacher.from_stage])
    inputs = stage_inputs(stage, pipeline)
    if stage.resume and (record := finished_record(stage, inputs)) is not None:
        start = record.inputs.get("start")
        pipeline.add(name, stage, record.final, Path(start) if start else None)
        log(f"{name}: finished in an earlier run ({record.seconds:.0f} s); skipped, output {record.final}")
        return record.final
    model_path = start_from(stage.model, pipeline.outputs, log) if hasattr(stage, "model") else None
    if model_path is not None:
        inputs["start"] = str(model_path)
    run = RunDir(stage.output_dir, stage)
    record = StageRecord.begin(run.root, name, stage.kind, inputs, stage.resume)
    run.log.info("stage %s (%s) starting from %s", stage.name, stage.kind, model_path)
    progress = Progress(name, on_step=record.tick)
    try:
        final = runner(stage, run, pipeline if stage.kind in NEEDS_PIPELINE else model_path, progress)
    finally:
        progress.close()
        run.close()
        plot_run(run.root)
        record.tick(force=True)
    record.finish(final)
    pipeline.add(name, stage, final, model_path)
    log(f"{name}: done in {record.seconds:.0f} s; run directory {run.root}"
        + (f", final checkpoint {final}" if final != run.root else ""))
    return final


def stage_inputs(stage: StageRecipe, pipeline: PipelineState) -> dict[str, str]:
    """What a stage starts from, as its record keeps it: `start` (the checkpoint, when known without training the
    warm start), or for an evaluation the checkpoints it grades."""
    if stage.kind == "evaluate":
        from dspost.evaluate import checkpoints_to_evaluate

        return {row: str(path) for row, path in checkpoints_to_evaluate(stage, pipeline).items()}
    if not hasattr(stage, "model"):
        return {}
    from dspost.starting_point import starting_point

    start = starting_point(stage.model, pipeline.outputs)
    return {"start": str(start)} if start is not None else {}


def finished_record(stage: StageRecipe, inputs: dict[str, str]) -> StageRecord | None:
    """The record of a stage that finished with this recipe from these inputs, else None (run it, resuming). A
    training stage is finished when its `checkpoints/latest` names `step_<trainer.max_steps>` (a longer run
    continues). A recipe changed in a field a resumed run may not change is refused, as when resuming; so is a
    finished training stage whose start checkpoint has changed (its checkpoints were trained from another); an
    evaluation with other checkpoints or settings runs again."""
    root = Path(stage.output_dir)
    record = StageRecord.read(root)
    if record is None or not record.finished or record.final is None or not record.final.exists():
        return None
    config = root / "config.yaml"
    if not config.is_file():
        return None
    resolved = stage.model_dump(mode="json")
    if stage.kind == "evaluate":
        try:
            check_resumable(config, resolved)
        except RunDirError:
            return None
        return record if record.inputs == inputs else None
    check_resumable(config, resolved)
    trainer = getattr(stage, "trainer", None)
    if trainer is not None:
        latest = RunDir(root).latest_checkpoint()
        if latest is None or latest.name != f"step_{trainer.max_steps}":
            return None
    old, new = record.inputs.get("start"), inputs.get("start")
    if old and new and Path(old) != Path(new):
        raise RunDirError(f"{root}: finished from {old}, but its start is now {new}; its checkpoints were trained "
                          "from the old one: use a new output_dir to train from the new one")
    return record


def start_from(section: ModelSection, stage_outputs: dict[str, Path] | None, log=print) -> Path:
    """The checkpoint a stage starts from; the tiny-math warm start is trained here the first time it is needed."""
    from dspost.starting_point import WARM_START_RECIPE, starting_point, warm_start

    path = starting_point(section, stage_outputs)
    if path is None:
        recipe, path = warm_start()
        log(f"tiny-math warm start not cached: training it once with {WARM_START_RECIPE.name} into {recipe.output_dir}")
        run_stage(recipe, log=log)
    return path


def run_recipe(recipe: Recipe, log=print) -> dict[str, Path]:
    """Run every stage in order; returns each stage's output by name. A pipeline's stages default their names
    (`stage<i>`) and run directories (`<output_dir>/<name>`, its output_dir defaulting to `runs/<name>-<time>`),
    and its `resume=true` applies to every stage."""
    pipeline = PipelineState()
    if isinstance(recipe, PipelineRecipe):
        if recipe.output_dir is None:
            recipe.output_dir = str(default_output_dir(recipe.name or "pipeline"))
        pipeline.root = Path(recipe.output_dir)
    for i, (prefix, stage) in enumerate(stages_of(recipe)):
        if prefix:
            stage.name = stage.name or f"stage{i}"
            stage.output_dir = stage.output_dir or str(pipeline.root / stage.name)
            stage.resume = stage.resume or recipe.resume
        run_stage(stage, pipeline, log)
    return pipeline.outputs
