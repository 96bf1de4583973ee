"""GRPO-family RL: vLLM rollout actors and trainer actors on Ray, weights synced after every update.

What one step does, in order: generate `prompts_per_step x n` samples on the rollout pool -> score them
with the reward terms (rule rewards in sandboxed worker processes, critics in the driver) -> group advantages
(DAPO: overlong penalty, dynamic sampling) -> one or more optimizer steps on the trainer pool -> push the new
weights into every engine -> probe: engine vs trainer logprobs on a fixed batch -> every `eval_every` steps
held-out accuracy on the engines -> every `save_every` steps a checkpoint. The phases are `dspost/rl.py`'s.
Deviations from the papers: the "old" policy is the trainer's own logprob before the update, and the
engine/trainer mismatch is corrected by a truncated importance weight (`algorithm.tis_cap`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dspost.algorithms import group_advantages
from dspost.config import GRPORecipe
from dspost.rl import rl_session, timed
from dspost.rundir import RunDir


def run_grpo(recipe: GRPORecipe, run: RunDir, model_path: Path, progress=None) -> Path:
    r, a = recipe.rollout, recipe.algorithm
    with rl_session(recipe, run, model_path) as rl:
        for step in rl.steps():
            times: dict[str, float] = {}
            with timed(times, "generate"):
                samples, examples = rl.generate(step)
            with timed(times, "score"):
                rewards, metrics = rl.score(samples, examples, step)
            with timed(times, "advantages"):
                lengths = torch.tensor([float(len(s.response_ids)) for s in samples])
                advantages, keep = group_advantages(a, rewards, lengths, r.n, r.max_tokens)
            with timed(times, "update"):
                metrics.update(rl.update(samples, advantages, keep, step))
            with timed(times, "sync"):
                metrics.update(rl.sync(step))
            generated = sum(len(s.response_ids) for s in samples)
            metrics.update({"response/length_mean": generated / len(samples),
                            "perf/rollout_tokens_per_s": generated / times["time/generate"],
                            "perf/train_tokens_per_s": metrics.get("train/tokens", 0) / times["time/update"],
                            "data/kept_fraction": float(keep.float().mean())})
            rl.end_step(step, metrics, times, progress)
        return rl.output()
