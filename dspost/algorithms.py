"""GRPO-family advantages and policy losses: small pure functions picked by name.

Tensors are [B, T] over response tokens (B sequences, T padded response length) with `mask` 1 on real
tokens. Every loss multiplies the per-token term by a truncated importance weight
w = min(pi_old / pi_rollout, cap) (detached), correcting for the rollout engine's logprobs differing from
the trainer's; with one optimizer step per batch pi_old is the trainer's own logprob before the update.
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
    loss = _masked_mean(per_token, x.mask, dim=1).mean()
    return loss, {"clip_frac": float(_masked_mean(clipped, x.mask))}


def dr_grpo_loss(x: LossInputs, cfg) -> tuple[Tensor, dict[str, float]]:
    """Dr. GRPO: no length normalisation; token sums divided by a constant (the longest response)."""
    ratio = (x.logprobs - x.old_logprobs).exp()
    per_token, clipped = _clipped(ratio, x.advantages[:, None], cfg.eps_low, cfg.eps_high)
    per_token = per_token * _tis(x, cfg.tis_cap)
    loss = (per_token * x.mask).sum() / (x.mask.shape[0] * x.mask.shape[1])
    return loss, {"clip_frac": float(_masked_mean(clipped, x.mask))}


def dapo_loss(x: LossInputs, cfg) -> tuple[Tensor, dict[str, float]]:
    """DAPO: token-level mean over the whole batch with clip-higher (eps_high > eps_low)."""
    ratio = (x.logprobs - x.old_logprobs).exp()
    per_token, clipped = _clipped(ratio, x.advantages[:, None], cfg.eps_low, cfg.eps_high)
    per_token = per_token * _tis(x, cfg.tis_cap)
    return _masked_mean(per_token, x.mask), {"clip_frac": float(_masked_mean(clipped, x.mask))}


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
    return per_seq.mean(), {"clip_frac": float(clipped.mean())}


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
        loss = loss - cfg.entropy_coef * _masked_mean(x.entropy, x.mask)
    if cfg.kl_beta > 0 and x.ref_logprobs is not None:
        kl = _masked_mean(KL_ESTIMATORS[cfg.kl_estimator](x.logprobs, x.ref_logprobs), x.mask)
        loss = loss + cfg.kl_beta * kl
        metrics["kl"] = float(kl.detach())
    return loss, metrics
