"""Critics as GRPO reward terms, watched by the meta-critic.

A `critic:SPEC` term is scored in the driver by a `dspost.rewards.critics` critic (a reward model is one
forward over the batch; it does not belong in the per-item scoring processes). When `rewards.meta_critic` names
the term, every `every` steps the meta-critic checks the raw critic on the reference set, logs `meta/...`
metrics, and its policy decides what the term scores with until the next check (`report`: the critic as is;
`correct`: the critic minus its measured length slope; `gate`: the critic at `gate_weight` while flagged)."""

from __future__ import annotations

import json
import re

import torch

from dspost.config import MetaCriticSection, RewardsSection
from dspost.rewards.critics import make_critic
from dspost.rewards.meta_critic import PolicyState, apply_policy, assess, flat_metrics, load_reference

PREFIX = "critic:"


def is_critic(name: str) -> bool:
    return name.startswith(PREFIX)


class CriticTerm:
    def __init__(self, name: str, weight: float, meta: MetaCriticSection | None = None, log=None):
        self.name, self.weight, self.meta, self.log = name, weight, meta, log
        # A metric-safe key: reward-model paths carry slashes, which would nest metric groups.
        self.key = "critic_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name[len(PREFIX):]).strip("_")[-40:]
        self.raw = make_critic(name[len(PREFIX):])
        self.state = PolicyState(self.raw)
        self.checked = False
        self.reference = load_reference(meta.reference) if meta is not None else None

    def check(self, step: int) -> dict[str, float]:
        """Run the meta-critic when due (and at the first step of a run, resumed or not, so the policy is in
        force from the start); returns its metrics (empty when not due)."""
        if self.meta is None or (step % self.meta.every and self.checked):
            return {}
        self.checked = True
        report = assess(self.raw, self.reference)
        self.state = apply_policy(self.meta.policy, self.raw, report, self.reference, self.meta.gate_weight)
        if self.log is not None:
            self.log.info("meta-critic on %s at step %d: %s", self.name, step,
                          json.dumps({k: v["verdict"] for k, v in report["slices"].items()} | {"length": report["length_bias"]["verdict"]}))
        slope = getattr(self.state.critic, "slope", 0.0)
        return {**flat_metrics(report), "meta/weight_scale": self.state.weight_scale, "meta/length_slope": slope}

    def scores(self, prompts: list[str], responses: list[str], answers: list[str | None]) -> tuple[torch.Tensor, int]:
        """Weighted scores (a failed score counts 0) and the number of failures."""
        raw = self.state.critic.score(prompts, responses, answers)
        failed = sum(s is None for s in raw)
        values = torch.tensor([0.0 if s is None else float(s) for s in raw])
        return self.weight * self.state.weight_scale * values, failed

    def close(self) -> None:
        self.raw.close()


def critic_terms(rewards: RewardsSection, log=None) -> list[CriticTerm]:
    names = [t.name for t in rewards.terms if is_critic(t.name)]
    meta = rewards.meta_critic
    watched = (meta.term or names[0]) if meta is not None else None
    return [CriticTerm(t.name, t.weight, meta if t.name == watched else None, log)
            for t in rewards.terms if is_critic(t.name)]
