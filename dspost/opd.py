"""On-policy distillation (`kind: opd`): the student samples on the rollout pool exactly as in GRPO, each sample is
scored by its domain's teacher (`dspost/teacher.py`) at the rollout temperature, and the trainer minimises the
reverse KL sum_i w_i KL(pi_student || pi_teacher_i) on the student's own samples (`opd.estimator`, see
`dspost/algorithms.py`), as DeepSeek-V4 consolidates its specialists into one model.

What one step does, in order: generate `prompts_per_step x n` samples on the rollout pool -> teacher scoring (the
sampled tokens' logprobs; the teacher's top-k for `topk`, its whole rows for `full`) -> outcome rewards, only when a
reward term has a weight (group-normalised, added to the distillation) -> the update on the trainer pool -> push
the weights into every engine and probe their parity -> every `eval_every` steps held-out accuracy per domain ->
every `save_every` steps a checkpoint. Every phase but the teacher's is `dspost/rl.py`'s, shared with GRPO.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dspost.algorithms import group_normalised
from dspost.config import OPDRecipe
from dspost.rl import RLSession, engine_kwargs, rl_session, timed
from dspost.rundir import RunDir
from dspost.teacher import TeacherPool, TeacherScores, teacher_specs


def run_opd(recipe: OPDRecipe, run: RunDir, model_path: Path, progress=None) -> Path:
    o, r = recipe.opd, recipe.rollout
    weights = [t.weight for t in recipe.teachers]
    if o.init == "task_arithmetic":
        model_path = merged_start(recipe, run, model_path)
    with rl_session(recipe, run, model_path) as rl:
        teachers = start_teachers(recipe, rl, model_path)
        for step in rl.steps():
            times: dict[str, float] = {}
            with timed(times, "generate"):
                samples, examples = rl.generate(step)
            with timed(times, "teacher"):
                domains = [ex.domain for ex in examples]
                index = teachers.route(domains)
                scores = teachers.score(samples, domains, r.temperature, k=o.top_k if o.estimator == "topk" else 0,
                                        full=o.estimator == "full")
            metrics: dict[str, float] = {}
            advantages = torch.zeros(len(samples))
            if recipe.outcome_reward:
                with timed(times, "score"):
                    rewards, metrics = rl.score(samples, examples, step)
                    advantages = group_normalised(rewards, r.n)
            with timed(times, "update"):
                keep = torch.ones(len(samples), dtype=torch.bool)
                metrics.update(rl.update(samples, advantages, keep, step,
                                         **teacher_fields(scores, index, weights, o.estimator)))
            with timed(times, "sync"):
                metrics.update(rl.sync(step))
            generated = sum(len(s.response_ids) for s in samples)
            metrics.update({"response/length_mean": generated / len(samples),
                            "perf/rollout_tokens_per_s": generated / times["time/generate"],
                            "perf/teacher_tokens_per_s": generated / times["time/teacher"],
                            "perf/train_tokens_per_s": metrics.get("train/tokens", 0) / times["time/update"]})
            rl.end_step(step, metrics, times, progress)
        return rl.output()


def merged_start(recipe: OPDRecipe, run: RunDir, model_path: Path) -> Path:
    """`opd.init: task_arithmetic`: the student's start, `model + merge_scale * sum_i (teacher_i - model)`, in the
    run's `init/` (written once, atomically; a resumed run finds it there)."""
    from dspost.merging import task_arithmetic

    out = run.root / "init"
    if not (out / "config.json").is_file():
        t0 = time.perf_counter()
        task_arithmetic(model_path, [t.path for t in recipe.teachers], recipe.opd.merge_scale, out)
        run.log.info("student start: %s + %g x the task vectors of %s (%.1f s)", model_path, recipe.opd.merge_scale,
                     ", ".join(str(t.path) for t in recipe.teachers), time.perf_counter() - t0)
    return out


def start_teachers(recipe: OPDRecipe, rl: RLSession, student: Path) -> TeacherPool:
    """The teacher pool (stopped with the session), after checking every teacher scores the student's token ids.
    `teachers[i].path` is set: loading refuses `from_stage` outside a pipeline, whose runner resolves it."""
    specs = teacher_specs(recipe.teachers, [t.path for t in recipe.teachers])
    pool = TeacherPool(specs, recipe.model.dtype, recipe.algorithm.pack_len, engine_kwargs(recipe),
                       recipe.sync.parity_threshold)
    rl.running.callback(pool.shutdown)
    pool.check_tokenizer(student)
    return pool


def teacher_fields(scores: list[TeacherScores], index: list[int], weights: list[float],
                   estimator: str) -> dict[str, list]:
    """The per-sample teacher data an update needs (`RolloutBatch`'s teacher fields), for the estimator in use."""
    fields = {"teacher_logprobs": [s.token_logprobs for s in scores], "teacher_index": index,
              "teacher_weight": [weights[i] for i in index]}
    if estimator == "topk":
        fields["support_ids"] = [s.support_ids for s in scores]
        fields["support_logprobs"] = [s.support_logprobs for s in scores]
    if estimator == "full":
        fields["teacher_rows"] = [s.rows for s in scores]
    return fields
