"""Reward terms: what scores an RL step's samples, one small class family with one shape.

Every term has a `name`, a metric-safe `key` and a `weight`, and answers `score(samples, examples)` with a
`TermScores` (weighted values, metrics, and how many samples it could not score) and `check(step)` (metrics of its
own checks, when due). `RuleTerm`: a rule reward of `dspost.rewards` (`math`, `format`, `code`, `pkg.mod:fn`) run
in the scoring pool's sandboxed worker processes, never in the driver; its verdicts' statuses are counted.
`CriticTerm`: a scalar critic scored in the driver.

A `critic:SPEC` term is scored in the driver by a `dspost.rewards.critics` critic (a reward model is one
forward over the batch; it does not belong in the per-item scoring processes). When `rewards.meta_critic` names
the term, every `every` steps the meta-critic checks the raw critic on the reference set, logs `meta/...`
metrics, and its policy decides what the term scores with until the next check (`report`: the critic as is;
`correct`: the critic minus its measured length slope; `gate`: the critic at `gate_weight` while flagged)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch

from dspost.config import MetaCriticSection, RewardsSection, RewardTerm
from dspost.data.loading import Example
from dspost.rewards import STATUSES, ScoringPool, Verdict, resolve
from dspost.rewards.critics import make_critic
from dspost.rewards.meta_critic import PolicyState, apply_policy, assess, flat_metrics, load_reference
from dspost.rollout.engine import Sample

PREFIX = "critic:"


def is_critic(name: str) -> bool:
    return name.startswith(PREFIX)


@dataclass
class TermScores:
    values: torch.Tensor  # [N] weighted scores (0 where the term could not score, or does not score the domain)
    metrics: dict[str, float]
    errors: int  # samples the term could not score (a crashed scorer, no sandbox, a failed critic)
    scored: int  # samples of the term's domains
    first_error: str = ""
    correct: torch.Tensor | None = None  # [N] bool, rule terms: the verdict was `correct`


def in_domains(domains: list[str], examples: list[Example]) -> list[int]:
    """Indices of the examples a term with these `domains` scores (all, when it names none)."""
    return [i for i, ex in enumerate(examples) if not domains or ex.domain in domains]


class RuleTerm:
    """A rule reward scored in the scoring pool's worker processes (time-, memory- and network-limited)."""

    def __init__(self, term: RewardTerm, pool: ScoringPool, timeout: float):
        self.name, self.key, self.weight, self.options = term.name, term.name, term.weight, term.options
        self.domains, self.target, self.pool, self.timeout = term.domains, resolve(term.name), pool, timeout

    def check(self, step: int) -> dict[str, float]:
        return {}

    def verdicts(self, samples: list[Sample], examples: list[Example]) -> list[Verdict]:
        """One verdict per sample: its text graded against its example's gold fields."""
        items = [(s.text, {"answer": ex.answer, **ex.extra}) for s, ex in zip(samples, examples, strict=True)]
        return self.pool.map(self.target, items, self.timeout, self.options)

    def score(self, samples: list[Sample], examples: list[Example]) -> TermScores:
        mine = in_domains(self.domains, examples)
        verdicts = self.verdicts([samples[i] for i in mine], [examples[i] for i in mine]) if mine else []
        errors = [v for v in verdicts if v.status == "error"]
        metrics = {f"reward/{self.key}/{status}": sum(v.status == status for v in verdicts) for status in STATUSES}
        metrics[f"reward/{self.key}/mean"] = sum(v.score for v in verdicts) / max(len(verdicts), 1)
        values, correct = torch.zeros(len(samples)), torch.zeros(len(samples), dtype=torch.bool)
        for i, v in zip(mine, verdicts):
            values[i], correct[i] = self.weight * v.score, v.status == "correct"
        return TermScores(values, metrics, len(errors), len(mine), errors[0].detail if errors else "", correct)

    def close(self) -> None:
        pass


class CriticTerm:
    """A scalar critic (`critic:length`, `critic:rule:NAME`, `critic:DIR`), watched by the meta-critic when
    `rewards.meta_critic` names it."""

    def __init__(self, name: str, weight: float, meta: MetaCriticSection | None = None, log=None,
                 domains: list[str] = ()):
        self.name, self.weight, self.meta, self.log, self.domains = name, weight, meta, log, list(domains)
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

    def score(self, samples: list[Sample], examples: list[Example]) -> TermScores:
        """Weighted scores (a failed score counts 0) of each sample against its prompt's last user turn."""
        mine = in_domains(self.domains, examples)
        prompts = [next(m["content"] for m in reversed(examples[i].messages[:-1]) if m["role"] == "user") for i in mine]
        raw = self.state.critic.score(prompts, [samples[i].text for i in mine], [examples[i].answer for i in mine])
        failed = sum(s is None for s in raw)
        values = torch.zeros(len(samples))
        for i, s in zip(mine, raw):
            values[i] = self.weight * self.state.weight_scale * (0.0 if s is None else float(s))
        mean = float(values[mine].mean()) if mine else 0.0
        return TermScores(values, {f"reward/{self.key}/mean": mean, f"reward/{self.key}/error": failed}, failed,
                          len(mine), "the critic gave no score" if failed else "")

    def close(self) -> None:
        self.raw.close()


def reward_terms(rewards: RewardsSection, pool: ScoringPool, log=None) -> list[RuleTerm | CriticTerm]:
    """The recipe's reward terms in order; the meta-critic watches `meta_critic.term` (or the first critic)."""
    meta = rewards.meta_critic
    critics = [t.name for t in rewards.terms if is_critic(t.name)]
    watched = (meta.term or critics[0]) if meta is not None else None
    return [CriticTerm(t.name, t.weight, meta if t.name == watched else None, log, t.domains) if is_critic(t.name)
            else RuleTerm(t, pool, rewards.timeout) for t in rewards.terms]


def verifier(terms: list[RuleTerm | CriticTerm], domain: str | None) -> RuleTerm | None:
    """A domain's verifier: the first rule term that scores it (weight 0 included: it grades evaluation)."""
    return next((t for t in terms if isinstance(t, RuleTerm) and (not t.domains or domain in t.domains)), None)
