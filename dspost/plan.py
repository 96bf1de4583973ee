"""The resource plan of a recipe: which actors, how many CPUs/GPUs each, where each model lives.

Checked before anything starts: a plan that cannot fit on the local machine is a `RecipeError`.
On a remote Ray cluster only the cluster knows its size, so the check is left to Ray's scheduler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dspost.config import ModelSection, Recipe, StageRecipe, TeacherSection
from dspost.recipe import RecipeError, stages_of


@dataclass(frozen=True)
class Actor:
    name: str
    cpus: float
    gpus: float
    holds: str
    ray: bool = True
    colocated: bool = False  # a Ray actor reserving nothing: it shares the cores of the actors it alternates with


@dataclass
class Plan:
    stage: str
    kind: str
    actors: list[Actor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def cpus(self) -> float:
        return sum(a.cpus for a in self.actors)

    @property
    def gpus(self) -> float:
        return sum(a.gpus for a in self.actors)

    @property
    def uses_ray(self) -> bool:
        return any(a.ray for a in self.actors)


def model_source(model: ModelSection) -> str:
    if model.from_stage:
        return f"final checkpoint of stage {model.from_stage!r}"
    if model.path:
        return model.path
    warm = model.preset == "tiny-math" and model.warm_start  # tiny-dense has no warm start
    return f"preset {model.preset}" + (" (SFT warm start)" if warm else " (random init)")


def _trainers(stage: StageRecipe, holds: str) -> list[Actor]:
    t = stage.trainer
    in_process = t.num_workers == 1
    return [
        Actor(f"trainer[{i}]", t.num_cpus_per_worker, t.num_gpus_per_worker, holds, ray=not in_process)
        for i in range(t.num_workers)
    ]


def _teachers(teachers: list[TeacherSection]) -> list[Actor]:
    """One Ray actor per teacher; one reserving neither CPU nor GPU is colocated with the pools."""
    from dspost.teacher import teacher_names

    return [Actor(f"teacher[{name}]", t.num_cpus, t.num_gpus,
                  f"teacher ({t.path or f'final checkpoint of stage {t.from_stage!r}'})",
                  colocated=t.num_cpus == 0 and t.num_gpus == 0)
            for name, t in zip(teacher_names(teachers), teachers)]


def _plan_stage(name: str, stage: StageRecipe) -> Plan:
    plan = Plan(stage=name, kind=stage.kind)
    if stage.kind == "eval_rm":
        holds = f"critic {stage.critic}" + (" (an in-process vLLM engine)" if stage.critic.startswith("judge:") else "")
        plan.actors.append(Actor("evaluator", 1, 0, holds, ray=False))
        return plan
    if stage.kind == "evaluate":
        r = stage.rollout
        rows = ", ".join(stage.stages) if stage.stages else "every earlier model stage"
        plan.actors += [Actor(f"rollout[{i}]", r.num_cpus_per_worker, r.num_gpus_per_worker,
                              f"vLLM engine serving each checkpoint graded in turn (start, {rows})")
                        for i in range(r.num_workers)]
        plan.notes.append("checkpoints of one architecture share the engine (weights pushed in); another architecture "
                          "gets a new one")
        plan.notes.append(f"reward scoring: {stage.rewards.num_workers} worker processes beside the driver")
        return plan
    policy = model_source(stage.model)
    role = "reward model" if stage.kind == "rm" else "policy"
    train_holds = f"{role} ({policy}) + optimizer" + (" + LoRA adapters" if stage.trainer.lora else "")
    if stage.kind in ("grpo", "opd") and stage.algorithm.kl_beta > 0:
        train_holds += " + reference model"
    if stage.kind in ("sft", "rm"):
        plan.actors += _trainers(stage, train_holds)
        return plan
    r = stage.rollout
    plan.actors += [
        Actor(f"rollout[{i}]", r.num_cpus_per_worker, r.num_gpus_per_worker, f"vLLM engine serving the policy ({policy})")
        for i in range(r.num_workers)
    ]
    # RL needs the rollout and trainer pools side by side, so trainers are Ray actors even when alone.
    plan.actors += [Actor(a.name, a.cpus, a.gpus, a.holds, ray=True) for a in _trainers(stage, train_holds)]
    if stage.kind == "opd":
        plan.actors += _teachers(stage.teachers)
        if any(a.colocated for a in plan.actors):
            plan.notes.append("colocated teachers reserve no CPU: they share the rollout and trainer cores, and "
                              "generation, teacher scoring and the update run one after another")
    plan.notes.append(f"reward scoring: {stage.rewards.num_workers} worker processes beside the driver")
    return plan


def build_plans(recipe: Recipe) -> list[Plan]:
    return [_plan_stage(prefix.rstrip(".") or (stage.name or "run"), stage) for prefix, stage in stages_of(recipe)]


def local_gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def ray_address(stage: StageRecipe) -> str | None:
    return stage.ray.address or os.environ.get("RAY_ADDRESS")


def check_plan(recipe: Recipe) -> list[Plan]:
    """Build the plans and refuse any that cannot run here (local cluster or in-process)."""
    plans = build_plans(recipe)
    for (prefix, stage), plan in zip(stages_of(recipe), plans):
        if ray_address(stage):
            plan.notes.append(f"Ray cluster at {ray_address(stage)}: its scheduler places the actors")
            continue
        cpus_here = stage.ray.num_cpus or os.cpu_count() or 1
        if plan.cpus > cpus_here:
            detail = ", ".join(f"{a.name} {a.cpus:g}" for a in plan.actors)
            raise RecipeError(
                f"{prefix}resources: the plan needs {plan.cpus:g} CPUs ({detail}) but the local cluster has "
                f"{cpus_here}; lower *.num_cpus_per_worker or *.num_workers, or set ray.address"
            )
        gpus_here = local_gpu_count()
        if plan.gpus > gpus_here:
            raise RecipeError(
                f"{prefix}resources: the plan needs {plan.gpus:g} GPUs but this machine has {gpus_here}; "
                f"set *.num_gpus_per_worker=0 or set ray.address"
            )
    return plans


def format_plans(plans: list[Plan]) -> str:
    lines = []
    for plan in plans:
        where = "Ray actors" if plan.uses_ray else "in-process (no Ray)"
        lines.append(f"stage {plan.stage} [{plan.kind}]: {plan.cpus:g} CPUs, {plan.gpus:g} GPUs, {where}")
        for a in plan.actors:
            how = "colocated" if a.colocated else "ray" if a.ray else "local"
            lines.append(f"  {a.name:<12} cpus={a.cpus:<4g} gpus={a.gpus:<4g} {how}  holds {a.holds}")
        lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)
