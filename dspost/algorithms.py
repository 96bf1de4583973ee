"""GRPO-family advantages and policy losses: small pure functions picked by name.

Tensors are [B, T] over response tokens (B sequences, T padded response length) with `mask` 1 on real
tokens. Every loss multiplies the per-token term by a truncated importance weight
w = min(pi_old / pi_rollout, cap) (detached), correcting for the rollout engine's logprobs differing from
the trainer's; with one optimizer step per batch pi_old is the trainer's own logprob before the update.

A minibatch may be split into micro-batches (gradient accumulation) and over trainer workers; every mean is
therefore taken over the WHOLE minibatch: `LossInputs.tokens` / `sequences` carry its token and sequence counts
(default: this micro-batch's own), so the micro-batch losses add up to the minibatch's loss exactly.

On-policy distillation (the end of this file) trains the student on its own samples towards one teacher per
sample, minimising the per-token reverse KL(pi_student || pi_teacher) with one of three estimators.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class LossInputs:
    logprobs: Tensor  # current policy, with grad
    old_logprobs: Tensor  # policy before this batch's updates
    rollout_logprobs: Tensor  # what the rollout engine reported
    advantages: Tensor  # [B] per sequence, or [B, T] per token (on-policy distillation; not gspo)
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
def _per_token(advantages: Tensor) -> Tensor:
    """[B, T] advantages as they are; [B] per-sequence ones broadcast to every token of their sequence."""
    return advantages if advantages.dim() == 2 else advantages[:, None]


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
    per_token, clipped = _clipped(ratio, _per_token(x.advantages), cfg.eps_low, cfg.eps_high)
    per_token = per_token * _tis(x, cfg.tis_cap)
    loss = x.sequence_mean(_masked_mean(per_token, x.mask, dim=1))
    return loss, {"clip_frac": float(_masked_mean(clipped, x.mask))}


def dr_grpo_loss(x: LossInputs, cfg) -> tuple[Tensor, dict[str, float]]:
    """Dr. GRPO: no length normalisation; token sums divided by a constant, sequences x the longest response
    allowed (`max_len`, the recipe's `rollout.max_tokens`), as the paper and TRL do."""
    ratio = (x.logprobs - x.old_logprobs).exp()
    per_token, clipped = _clipped(ratio, _per_token(x.advantages), cfg.eps_low, cfg.eps_high)
    per_token = per_token * _tis(x, cfg.tis_cap)
    loss = x.sequence_mean((per_token * x.mask).sum(1)) / (x.max_len if x.max_len is not None else x.mask.shape[1])
    return loss, {"clip_frac": float(_masked_mean(clipped, x.mask))}


def token_pg_loss(x: LossInputs, cfg) -> tuple[Tensor, dict[str, float]]:
    """The clipped, importance-weighted token-level policy gradient: every token's term summed and divided by
    the minibatch's token count (a constant of the batch, not a per-sequence mean)."""
    ratio = (x.logprobs - x.old_logprobs).exp()
    per_token, clipped = _clipped(ratio, _per_token(x.advantages), cfg.eps_low, cfg.eps_high)
    per_token = per_token * _tis(x, cfg.tis_cap)
    return x.token_mean(per_token), {"clip_frac": float(_masked_mean(clipped, x.mask))}


def dapo_loss(x: LossInputs, cfg) -> tuple[Tensor, dict[str, float]]:
    """DAPO: token-level mean over the whole batch with clip-higher (eps_high > eps_low)."""
    return token_pg_loss(x, cfg)


def gspo_loss(x: LossInputs, cfg) -> tuple[Tensor, dict[str, float]]:
    """GSPO: sequence-level ratio exp(mean_t log pi/pi_old), clipped at [1-seq_eps_low, 1+seq_eps_high];
    the token gradient flows through sg(s_i) * pi_t / sg(pi_t). One advantage per sequence only: a sequence ratio
    cannot carry per-token advantages."""
    if x.advantages.dim() != 1:
        raise ValueError("algorithm.loss=gspo takes one advantage per sequence; per-token advantages (on-policy "
                         "distillation) need grpo, dr_grpo or dapo")
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
    bonus when entropy_coef > 0. The penalty's direction depends on the estimator: differentiated as a loss on
    the policy's own samples, k3 pulls towards the reference as the forward KL(ref || pi) does, k2 as the reverse
    KL(pi || ref), and k1 not at all in expectation (its expected gradient is zero)."""
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


# ------------------------------------------------------------------------------- on-policy distillation
# The student samples y ~ p at the rollout temperature T; each sample is scored by its domain's teacher q. The
# objective is sum_i w_i * E_{y ~ p}[sum_t KL(p(.|s_t) || q_i(.|s_t))] with the states s_t = (x, y_<t) held
# fixed (what `full` differentiates exactly, and what `sampled` estimates without bias at discount 0).
#
# Temperature: every logprob given to these functions, the student's and the teacher's, is already at the rollout
# temperature: log_softmax(logits / T). The trainer divides the student's logits by T; the teacher pool must score
# at the same T. A teacher scored at T=1 while the student samples at T=0.6 is another objective: it moves a
# student that equals its teacher (0.18 nats per token on the design toy; slime PR #2085).
#
# Never a k-estimator's VALUE as the loss: k1 = log p - log q has zero expected gradient, k3 gives the forward
# KL's gradient (measured on V=32: 0.0044 from grad KL(q||p), 0.48 from the reverse one). The `sampled` estimator
# puts sg(log p - log q) in a policy gradient instead, and no per-vocabulary term is ever clipped (TRL PR #5990:
# capping the positive summands p(v) log(p(v)/q(v)) makes the loss negative and pushes the student away).
def _log_floor(logp: Tensor) -> Tensor:
    """log max(prob, tiny): keeps -inf (a token the model cannot emit) finite inside products with a zero mass;
    changes nothing above 1e-38 (float32) or 1e-308 (float64)."""
    return logp.clamp(min=math.log(torch.finfo(logp.dtype).tiny))


def opd_advantages(old_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor, weights: Tensor,
                   discount: float = 0.0) -> Tensor:
    """Per-token advantages [B, T] of the `sampled` estimator: A_t = -w_i * sum_{t' >= t} discount^(t'-t) delta_t',
    delta_t = log p_old(y_t) - log q(y_t) (the sampled token's logprobs, at the rollout temperature), detached.

    Discount 0 (Tinker's default) is each token's own delta: unbiased for the states-fixed gradient that `full`
    differentiates. Discount 1 adds how this token changes the later states: unbiased for the gradient of the
    sequence KL, with more variance. Never the sequence sum broadcast to every token (that adds past terms: zero
    in expectation, pure variance). Detached: a live delta adds a zero-mean grad log p(y_t) per token (gradient
    variance 13.5 against 7.2 on the design toy, and a non-zero gradient when the teacher equals the student)."""
    delta = ((old_logprobs - teacher_logprobs) * mask).detach()
    if discount:
        acc = torch.zeros_like(delta[:, 0])
        for t in range(delta.shape[1] - 1, -1, -1):  # responses are at most rollout.max_tokens long
            acc = delta[:, t] + discount * acc
            delta[:, t] = acc
    return -weights.detach()[:, None].to(delta.dtype) * delta * mask


def full_reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Exact reverse KL(p || q) = sum_v p(v) (log p(v) - log q(v)) of rows [..., V] -> [...].

    `student_logp` are the student's log-softmax rows from the training forward, with their gradient: the gradient
    flows through the weights p(v) (the log p term contributes sum_v p grad log p = 0, so detaching p leaves no
    gradient at all). `teacher_logp` are data."""
    p = student_logp.exp()
    return (p * (_log_floor(student_logp) - _log_floor(teacher_logp.detach()))).sum(-1)


def _support(student_logp: Tensor, support_ids: Tensor, teacher_support_logp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The student's and the teacher's logprobs at the support ids, sorted by id, and a mask [..., K] that keeps
    each id's first occurrence: a support assembled as teacher top-k ++ sampled token ++ student top-k repeats ids,
    and each must count once (repeating an id is also how a short support is padded)."""
    ids, order = support_ids.sort(-1)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[..., 1:] = ids[..., 1:] != ids[..., :-1]
    return student_logp.gather(-1, ids), teacher_support_logp.detach().gather(-1, order), first


def topk_tail_reverse_kl(student_logp: Tensor, support_ids: Tensor, teacher_support_logp: Tensor) -> Tensor:
    """Reverse KL between the coarse-grained distributions over S + {tail}, per position [..., V] -> [...]:
    sum_{v in S} p(v) (log p(v) - log q(v)) + P_tail (log P_tail - log Q_tail), P_tail = 1 - sum_S p.

    S is `support_ids` [..., K] (the teacher's top-k, the sampled token and, when given, the student's top-k;
    duplicates count once); `teacher_support_logp` [..., K] is the teacher's logprob at each id (data), and
    `student_logp` [..., V] the student's full log-softmax rows from the training forward, with their gradient.
    It is the KL of a partition of the vocabulary, so it is >= 0, at most the full KL, non-decreasing as S grows,
    and equal to it when S is the whole vocabulary. Without the tail bucket the sum goes negative (739 of 2000
    random draws in the design note); the student's top-k matters because reverse KL lives where the student puts
    mass (V=1024 peaked toy, k=16: 0.73 of the full KL from the teacher's top-k, 0.97 with the student's added).
    Its gradient is the coarse KL's: with a tiny support it can point away from the full KL's (V=16, teacher top-1
    ++ y ++ student top-1: 118 of 2000 random states; none with top-6 of each)."""
    lp, lq, first = _support(student_logp, support_ids, teacher_support_logp)
    p, q = lp.exp() * first, lq.exp() * first
    inside = (p * (_log_floor(lp) - _log_floor(lq))).sum(-1)
    p_tail, q_tail = 1 - p.sum(-1), 1 - q.sum(-1)
    tiny = torch.finfo(lp.dtype).tiny  # rounding can leave a tail of -1e-8: clamped inside the logs only
    return inside + p_tail * (p_tail.clamp(min=tiny).log() - q_tail.clamp(min=tiny).log())


@dataclass
class DistillInputs:
    """One micro-batch of on-policy distillation, [B, T] over response tokens like `LossInputs`. Every logprob is
    at the rollout temperature; each sample's teacher fields come from the teacher of its domain."""

    logprobs: Tensor  # log p(y_t), training forward, with grad
    old_logprobs: Tensor  # before this batch's updates (detached)
    rollout_logprobs: Tensor  # what the rollout engine reported
    teacher_logprobs: Tensor  # log q(y_t) of the sample's teacher
    mask: Tensor
    weights: Tensor  # [B] w_i of each sample's teacher
    student_rows: Tensor | None = None  # [B, T, V] log-softmax rows of the training forward, with grad (topk, full)
    support_ids: Tensor | None = None  # [B, T, K] int64: teacher top-k ++ y_t (++ student top-k) (topk)
    teacher_support_logprobs: Tensor | None = None  # [B, T, K] log q at support_ids (topk)
    teacher_rows: Tensor | None = None  # [B, T, V] the teacher's log-softmax rows (full)
    outcome_advantages: Tensor | None = None  # [B] alpha * group-normalised outcome advantage; None: no reward
    tokens: float | None = None  # response tokens of the whole minibatch; None: mask.sum()

    def token_mean(self, v: Tensor) -> Tensor:
        """Sum of `v` over the real tokens, divided by the minibatch's token count (as `LossInputs.token_mean`)."""
        n = self.tokens if self.tokens is not None else self.mask.sum().clamp(min=1)
        return (v * self.mask).sum() / n

    def pg_inputs(self, advantages: Tensor) -> LossInputs:
        """The policy-gradient view of this batch with the given [B] or [B, T] advantages."""
        return LossInputs(self.logprobs, self.old_logprobs, self.rollout_logprobs, advantages, self.mask,
                          tokens=self.tokens)

    def rows(self, name: str) -> Tensor:
        """A field the `topk` / `full` estimators need, or a one-line error naming it."""
        v = getattr(self, name)
        if v is None:
            raise ValueError(f"the topk/full OPD estimators need DistillInputs.{name}")
        return v


Estimate = tuple[Tensor, Tensor, dict[str, float]]
"""(loss, per-token reverse KL [B, T] detached and 0 off the mask, metrics)."""


def sampled_estimate(x: DistillInputs, cfg, discount: float = 0.0) -> Estimate:
    """`sampled`: the clipped, importance-weighted token policy gradient (`token_pg_loss`: ratio to pi_old, the
    capped weight pi_old / pi_rollout, eps_low / eps_high) with the advantages of `opd_advantages`, plus the outcome
    advantage on every token when given. Per-token KL: the single-sample estimate delta_t (unbiased on-policy)."""
    adv = opd_advantages(x.old_logprobs, x.teacher_logprobs, x.mask, x.weights, discount)
    if x.outcome_advantages is not None:
        adv = adv + x.outcome_advantages.detach()[:, None] * x.mask
    loss, metrics = token_pg_loss(x.pg_inputs(adv), cfg)
    return loss, ((x.old_logprobs - x.teacher_logprobs) * x.mask).detach(), metrics


def _distribution_loss(x: DistillInputs, kl: Tensor, cfg) -> Estimate:
    """w-weighted token mean of the per-position KL (the minibatch's token count), plus the outcome reward's
    token policy gradient beside it when given (the KL part is never group-normalised: its scale is meaningful).
    No ratio and no importance weight on the KL part: the KL at a state is exact whichever policy reached it."""
    kl = torch.where(x.mask.bool(), kl, 0.0)
    loss = x.token_mean(x.weights.detach()[:, None] * kl)
    metrics: dict[str, float] = {}
    if x.outcome_advantages is not None:
        pg, metrics = token_pg_loss(x.pg_inputs(x.outcome_advantages.detach()), cfg)
        loss = loss + pg
    return loss, kl.detach(), metrics


def topk_estimate(x: DistillInputs, cfg, discount: float = 0.0) -> Estimate:
    """`topk`: `topk_tail_reverse_kl` at every response position as a differentiable loss (never as a detached
    advantage: a per-position constant in a policy gradient has zero expected gradient, Miles #2362). Metrics: the
    student's and the teacher's mass inside the support (token means of this micro-batch)."""
    rows, ids, lq = x.rows("student_rows"), x.rows("support_ids"), x.rows("teacher_support_logprobs")
    loss, kl, metrics = _distribution_loss(x, topk_tail_reverse_kl(rows, ids, lq), cfg)
    with torch.no_grad():
        lp_s, lq_s, first = _support(rows, ids, lq)
        metrics["student_mass"] = float(_masked_mean((lp_s.exp() * first).sum(-1), x.mask))
        metrics["teacher_mass"] = float(_masked_mean((lq_s.exp() * first).sum(-1), x.mask))
    return loss, kl, metrics


def full_estimate(x: DistillInputs, cfg, discount: float = 0.0) -> Estimate:
    """`full`: `full_reverse_kl` at every response position (V floats of the teacher per position: small
    vocabularies)."""
    return _distribution_loss(x, full_reverse_kl(x.rows("student_rows"), x.rows("teacher_rows")), cfg)


OPD_ESTIMATORS: dict[str, Callable[..., Estimate]] = {
    "sampled": sampled_estimate, "topk": topk_estimate, "full": full_estimate,
}


def distill_loss(x: DistillInputs, estimator: str, cfg, discount: float = 0.0) -> Estimate:
    """The on-policy distillation loss of the named estimator (`OPD_ESTIMATORS`), the per-token reverse KL [B, T]
    (detached, for `opd/reverse_kl` and the per-teacher metrics: see `opd_metrics`) and micro-batch metrics.
    `cfg` is the algorithm section (eps_low, eps_high, tis_cap); `discount` is the `sampled` estimator's."""
    if estimator not in OPD_ESTIMATORS:
        raise ValueError(f"opd.estimator={estimator!r}: expected one of {sorted(OPD_ESTIMATORS)}")
    if discount and estimator != "sampled":
        raise ValueError(f"opd.discount={discount} applies to the sampled estimator only, not {estimator!r}")
    return OPD_ESTIMATORS[estimator](x, cfg, discount)


def opd_metrics(kl: Tensor, mask: Tensor, teacher: Tensor, names: list[str]) -> dict[str, float]:
    """`opd/reverse_kl` (token mean over the batch) and, per teacher, `opd/<name>/reverse_kl` and `opd/<name>/tokens`
    from the per-token values of `distill_loss` [B, T] and each sample's teacher index [B] into `names`."""
    n = mask.sum()
    out = {"opd/reverse_kl": float((kl * mask).sum() / n.clamp(min=1))}
    for j, name in enumerate(names):
        m = mask * (teacher == j)[:, None]
        tokens = float(m.sum())
        out[f"opd/{name}/tokens"] = tokens
        if tokens:
            out[f"opd/{name}/reverse_kl"] = float((kl * m).sum() / tokens)
    return out
