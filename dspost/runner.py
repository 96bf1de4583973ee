"""Run a validated recipe: one stage, or a pipeline whose stages feed later ones."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dspost.config import EvalRMRecipe, GRPORecipe, ModelSection, OPDRecipe, Recipe, RMRecipe, SFTRecipe, StageRecipe
from dspost.plots import plot_run
from dspost.recipe import stages_of
from dspost.rundir import RunDir, default_output_dir


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

    def __init__(self, desc: str):
        self.desc, self.bar, self.fields, self.shown = desc, None, None, {}

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


STAGE_RUNNERS: dict[str, Callable[[StageRecipe, RunDir, Path, Progress], Path]] = {
    "sft": _sft, "grpo": _grpo, "opd": _opd, "rm": _rm, "eval_rm": _eval_rm}


def run_stage(stage: StageRecipe, stage_outputs: dict[str, Path] | None = None, log=print) -> Path:
    """Run one stage into its run directory and return its final checkpoint."""
    runner = STAGE_RUNNERS[stage.kind]  # `check_runnable` refused other kinds when the recipe was loaded
    model_path = start_from(stage.model, stage_outputs, log) if hasattr(stage, "model") else None
    for teacher in getattr(stage, "teachers", None) or []:  # recorded in the run's config.yaml as the path it was
        if teacher.from_stage and teacher.path is None:
            teacher.path = str(stage_outputs[teacher.from_stage])
    if stage.output_dir is None:
        stage.output_dir = str(default_output_dir(stage.name or stage.kind))
    run = RunDir(stage.output_dir, stage)
    run.log.info("stage %s (%s) starting from %s", stage.name, stage.kind, model_path)
    progress = Progress(stage.name or stage.kind)
    try:
        final = runner(stage, run, model_path, progress)
    finally:
        progress.close()
        run.close()
        plot_run(run.root)
    log(f"{stage.name}: done; run directory {run.root}" + (f", final checkpoint {final}" if final != run.root else ""))
    return final


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
    outputs: dict[str, Path] = {}
    stages = stages_of(recipe)
    for i, (prefix, stage) in enumerate(stages):
        if prefix:  # pipeline stage: default its name and run directory from the pipeline's
            stage.name = stage.name or f"stage{i}"
            if stage.output_dir is None and recipe.output_dir:
                stage.output_dir = str(Path(recipe.output_dir) / stage.name)
        outputs[stage.name or stage.kind] = run_stage(stage, outputs, log)
    return outputs
