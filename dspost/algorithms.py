"""GRPO-family advantages and policy losses: small pure functions picked by name.

Tensors are [B, T] over response tokens (B sequences, T padded response length) with `mask` 1 on real
tokens. Every loss multiplies the per-token term by a truncated importance weight
w = min(pi_old / pi_rollout, cap) (detached), correcting for the rollout engine's logprobs differing from
the trainer's; with one optimizer step per batch pi_old is the trainer's own logprob before the update.

A minibatch may be split into micro-batches (gradient accumulation) and over trainer workers; every mean is
therefore taken over the WHOLE minibatch: `LossInputs.tokens` / `sequences` carry its token and sequence counts
(default: this micro-batch's own), so the micro-batch losses add up to the minibatch's loss exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class LossInputs:
    logprobs: Tensor  # current policy, with grad
    old_logprobs: Tensor  # policy before this batch's updates
    rollout_logprobs: Tensor  # what the rollout engine reported
    advantages: Tensor  # [B]
    mask: Tensor
    ref_logprobs: Tensor | None = None
    entropy: Tensor | None = None  # per-token entropy of the current policy, with grad (entropy bonus)
    tokens: float | None = None  # response tokens of the whole minibatch (token means); None: mask.sum()
    sequences: float | None = None  # sequences of the whole minibatch (sequence means); None: B
    max_len: int | None = None  # Dr. GRPO's constant: the longest response allowed (rollout.max_tokens); None: T

    def token_mean(self, v: Tensor) -> Tensor:
        """Sum of `v` over the real tokens, divided by the minibatch's token count."""
        n = self.tokens if self.tokens is not None else self.mask.sum().clamp(min=1)
        return (v * self.mask).sum() / n

    def sequence_mean(self, per_sequence: Tensor) -> Tensor:
        """Sum of a per-sequence value [B], divided by the minibatch's sequence count."""
        return per_sequence.sum() / (self.sequences if self.sequences is not None else per_sequence.shape[0])


# ---------------------------------------------------------------------------------------- advantages
def group_normalised(rewards: Tensor, group: int, eps: float = 1e-6) -> Tensor:
    """GRPO / DAPO / GSPO: (r - mean) / std within each prompt's group of `group` samples."""
    r = rewards.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).flatten()


def group_centred(rewards: Tensor, group: int) -> Tensor:
    """Dr. GRPO: r - mean, no std normalisation."""
    r = rewards.view(-1, group)
    return (r - r.mean(1, keepdim=True)).flatten()


ADVANTAGES: dict[str, Callable[[Tensor, int], Tensor]] = {
    "grpo": group_normalised, "dr_grpo": group_centred, "dapo": group_normalised, "gspo": group_normalised,
}


def dapo_shaping(rewards: Tensor, lengths: Tensor, group: int, max_tokens: int, cfg) -> tuple[Tensor, Tensor]:
    """DAPO: the soft overlong penalty added to the rewards, and dynamic sampling (the groups kept, [B] bool)."""
    rewards = rewards + overlong_penalty(lengths, max_tokens, cfg.overlong_buffer)
    return rewards, informative_groups(rewards, group)


SHAPING: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {"dapo": dapo_shaping}
"""Reward shaping and sample selection before the advantages, for the algorithms that have them."""


def group_advantages(cfg, rewards: Tensor, lengths: Tensor, group: int, max_tokens: int) -> tuple[Tensor, Tensor]:
    """Advantages [B] of the algorithm `cfg.loss` and the samples it keeps [B] (responses `lengths` [B] tokens
    long, at most `max_tokens`)."""
    keep = torch.ones(len(rewards), dtype=torch.bool)
    if cfg.loss in SHAPING:
        rewards, keep = SHAPING[cfg.loss](rewards, lengths, group, max_tokens, cfg)
    return ADVANTAGES[cfg.loss](rewards, group), keep


def overlong_penalty(lengths: Tensor, max_tokens: int, cache: int) -> Tensor:
    """DAPO soft overlong punishment: 0 up to max - cache tokens, then linearly down to -1 at max."""
    start = max_tokens - cache
    return -((lengths - start).clamp(min=0) / max(cache, 1)).clamp(max=1.0)


def informative_groups(rewards: Tensor, group: int) -> Tensor:
    """DAPO dynamic sampling: keep groups whose rewards are not all equal; a [B] bool mask."""
    r = rewards.view(-1, group)
    return (r.max(1).values > r.min(1).values).repeat_interleave(group)


# ------------------------------------------------------------------------------------------------ KL
def kl_k1(logp: Tensor, ref: Tensor) -> Tensor:
    return logp - ref


def kl_k2(logp: Tensor, ref: Tensor) -> Tensor:
    return 0.5 * (logp - ref) ** 2


def kl_k3(logp: Tensor, ref: Tensor) -> Tensor:
    d = ref - logp
    return d.exp() - d - 1


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


# -------------------------------------------------------------------------------------------- losses
def _tis(x: LossInputs, cap: float) -> Tensor:
    return (x.old_logprobs - x.rollout_logprobs).exp().clamp(max=cap).detach()


def _clipped(ratio: Tensor, adv: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    unclipped, clipped = ratio * adv, ratio.clamp(1 - lo, 1 + hi) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).float()


def _masked_mean(v: Tensor, mask: Tensor, dim=None) -> Tensor:
    return (v * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def grpo_loss(x: LossInputs, cfg) -> tuple[Tensor, dict[str, float]]:
    """Token ratio clipped at [1-eps_low, 1+eps_high]; mean over each sequence, then over sequences."""
    ratio = (x.logprobs - x.old_logprobs).exp()
    per_token, clipped = _clipped(ratio, x.advantages[:, None], cfg.eps_low, cfg.eps_high)
    per_token = per_token * _tis(x, cfg.tis_cap)
    loss = x.sequence_mean(_masked_mean(per_token, x.mask, dim=1))
    return loss, {"clip_frac": float(_masked_mean(clipped, x.mask))}


def dr_grpo_loss(x: LossInputs, cfg) -> tuple[Tensor, dict[str, float]]:
    """Dr. GRPO: no length normalisation; token sums divided by a constant, sequences x the longest response
    allowed (`max_len`, the recipe's `rollout.max_tokens`), as the paper and TRL do."""
    ratio = (x.logprobs - x.old_logprobs).exp()
    per_token, clipped = _clipped(ratio, x.advantages[:, None], cfg.eps_low, cfg.eps_high)
    per_token = per_token * _tis(x, cfg.tis_cap)
    loss = x.sequence_mean((per_token * x.mask).sum(1)) / (x.max_len if x.max_len is not None else x.mask.shape[1])
    return loss, {"clip_frac": float(_masked_mean(clipped, x.mask))}


def dapo_loss(x: LossInputs, cfg) -> tuple[Tensor, dict[str, float]]:
    """DAPO: token-level mean over the whole batch with clip-higher (eps_high > eps_low)."""
    ratio = (x.logprobs - x.old_logprobs).exp()
    per_token, clipped = _clipped(ratio, x.advantages[:, None], cfg.eps_low, cfg.eps_high)
    per_token = per_token * _tis(x, cfg.tis_cap)
    return x.token_mean(per_token), {"clip_frac": float(_masked_mean(clipped, x.mask))}


def gspo_loss(x: LossInputs, cfg) -> tuple[Tensor, dict[str, float]]:
    """GSPO: sequence-level ratio exp(mean_t log pi/pi_old), clipped at [1-seq_eps_low, 1+seq_eps_high];
    the token gradient flows through sg(s_i) * pi_t / sg(pi_t)."""
    log_ratio = _masked_mean(x.logprobs - x.old_logprobs, x.mask, dim=1)
    # IS correction enters the sequence ratio as the mean token log-weight (capped), detached.
    tis = _masked_mean(_tis(x, cfg.tis_cap).log(), x.mask, dim=1)
    s = (log_ratio + tis).exp()
    token_s = s.detach()[:, None] * (x.logprobs - x.logprobs.detach()).exp()
    seq_s = _masked_mean(token_s, x.mask, dim=1)
    per_seq, clipped = _clipped(seq_s, x.advantages, cfg.seq_eps_low, cfg.seq_eps_high)
    return x.sequence_mean(per_seq), {"clip_frac": float(clipped.mean())}


LOSSES: dict[str, Callable[[LossInputs, object], tuple[Tensor, dict[str, float]]]] = {
    "grpo": grpo_loss, "dr_grpo": dr_grpo_loss, "dapo": dapo_loss, "gspo": gspo_loss,
}


def policy_loss(x: LossInputs, cfg) -> tuple[Tensor, dict[str, float]]:
    """The named policy loss, plus the KL penalty to the reference model when kl_beta > 0, minus the entropy
    bonus when entropy_coef > 0."""
    loss, metrics = LOSSES[cfg.loss](x, cfg)
    if cfg.entropy_coef > 0:
        if x.entropy is None or not x.entropy.requires_grad:
            raise ValueError("algorithm.entropy_coef > 0 needs the policy's entropy with its gradient")
        loss = loss - cfg.entropy_coef * x.token_mean(x.entropy)
    if cfg.kl_beta > 0 and x.ref_logprobs is not None:
        kl = x.token_mean(KL_ESTIMATORS[cfg.kl_estimator](x.logprobs, x.ref_logprobs))
        loss = loss + cfg.kl_beta * kl
        metrics["kl"] = float(kl.detach())
    return loss, metrics
