"""On-policy distillation estimators (dspost.algorithms): each against the exact reverse KL on categorical toys,
and the bugs peers shipped (a k-estimator's value as the loss, an undetached advantage, a top-k penalty as a
detached advantage, a dropped tail bucket, a per-vocabulary clip). References are written here with torch's
softmax / log, independently of the module. Everything is float64 on CPU, a few seconds in all."""

import math

import pytest
import torch

from dspost.algorithms import (OPD_ESTIMATORS, DistillInputs, LossInputs, distill_loss, full_reverse_kl,
                               opd_advantages, opd_metrics, policy_loss, token_pg_loss, topk_tail_reverse_kl)
from dspost.config import AlgorithmSection

F64 = torch.float64
CFG = AlgorithmSection(loss="dapo", eps_low=0.2, eps_high=0.28, tis_cap=2.0)


def lsm(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(z / temperature, -1)


def reverse_kl(student_logits, teacher_logits, temperature):
    """sum_v p (log p - log q), written with softmax and log rather than the module's code."""
    p = torch.softmax(student_logits / temperature, -1)
    return (p * (p.log() - torch.softmax(teacher_logits / temperature, -1).log())).sum(-1)


def grad_of(f, theta):
    th = theta.clone().requires_grad_(True)
    return torch.autograd.grad(f(th), th)[0]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def one_position(theta, y, teacher_lp, support=None, temperature=1.0, weight=1.0):
    """DistillInputs for N samples y [N] of one state: the student's row log_softmax(theta / T) [V] (theta with grad)
    shared by every sample, teacher logprobs [V] (data); support [K] ids add the sampled token per sample."""
    lp = lsm(theta, temperature)
    n = len(y)
    lp_y = lp[y][:, None]
    rows = lp.expand(n, 1, -1)
    ids = None if support is None else torch.cat([support.expand(n, -1), y[:, None]], -1)[:, None]
    return DistillInputs(lp_y, lp_y.detach(), lp_y.detach(), teacher_lp[y][:, None], torch.ones(n, 1, dtype=F64),
                         torch.full((n,), weight, dtype=F64), student_rows=rows, support_ids=ids,
                         teacher_support_logprobs=None if ids is None else teacher_lp[ids],
                         teacher_rows=teacher_lp.expand(n, 1, -1))


# -------------------------------------------------------------------------------------------------- sampled
def test_sampled_expected_gradient_matches_reverse_kl():
    """V=32, T=0.7, 400k on-policy samples of one state: the mean gradient of the `sampled` loss is the exact reverse
    KL's to 0.02 relative (measured 0.0060; the MC standard error of |E g| is ~0.004), and far (> 0.5; 0.84) from the
    forward KL's. A k1 value as the loss has expected gradient 0 (error 1.0), k3's value is the forward KL's (0.48
    from the reverse), a flipped sign -2. A teacher weight scales the gradient exactly."""
    torch.manual_seed(0)
    V, T, N = 32, 0.7, 400_000
    theta0 = torch.randn(V, dtype=F64) * 1.5
    teacher = theta0 + torch.randn(V, dtype=F64)
    y = torch.multinomial(torch.softmax(theta0 / T, -1), N, replacement=True)
    lq = lsm(teacher, T)  # the teacher at the rollout temperature

    def loss(weight):
        return lambda th: distill_loss(one_position(th, y, lq, temperature=T, weight=weight), "sampled", CFG)[0]

    g = grad_of(loss(1.0), theta0)
    g_reverse = grad_of(lambda th: reverse_kl(th, teacher, T), theta0)
    g_forward = grad_of(lambda th: reverse_kl(teacher, th, T), theta0)
    assert rel(g, g_reverse) < 0.02
    assert rel(g, g_forward) > 0.5
    torch.testing.assert_close(grad_of(loss(0.5), theta0), 0.5 * g, rtol=1e-12, atol=1e-15)


def test_discount_zero_is_the_states_fixed_gradient_and_one_the_sequence_kl():
    """A 2-token toy (V=6), exact expectations by enumerating all 36 responses (the teacher weight carries each
    response's probability, so the token mean is the expectation). Discount 0 is unbiased for what `full`
    differentiates (states held fixed); discount 1 for the gradient of the sequence KL; the two differ by 7%."""
    torch.manual_seed(6)
    V = 6
    s1, s2 = torch.randn(V, dtype=F64), torch.randn(V, V, dtype=F64)  # student logits of token 1, token 2 | y1
    t1, t2 = s1 + torch.randn(V, dtype=F64), s2 + torch.randn(V, V, dtype=F64)
    y1, y2 = torch.arange(V).repeat_interleave(V), torch.arange(V).repeat(V)
    ones = torch.ones(V * V, 2, dtype=F64)

    def batch(a1, a2):
        lp1, lp2 = lsm(a1), lsm(a2)
        lp = torch.stack([lp1[y1], lp2[y1, y2]], 1)
        prob = (lp.sum(1)).exp().detach()
        rows = torch.stack([lp1.expand(V * V, V), lp2[y1]], 1)
        teacher_rows = torch.stack([lsm(t1).expand(V * V, V), lsm(t2)[y1]], 1)
        return DistillInputs(lp, lp.detach(), lp.detach(), teacher_rows.gather(-1, torch.stack([y1, y2], 1)[..., None])[..., 0],
                             ones, prob * ones.sum(), student_rows=rows, teacher_rows=teacher_rows)

    def expected(estimator, discount=0.0):
        a1, a2 = s1.clone().requires_grad_(True), s2.clone().requires_grad_(True)
        return torch.cat([g.flatten() for g in torch.autograd.grad(
            distill_loss(batch(a1, a2), estimator, CFG, discount)[0], (a1, a2))])

    a1, a2 = s1.clone().requires_grad_(True), s2.clone().requires_grad_(True)
    lp1, lp2, lq1, lq2 = lsm(a1), lsm(a2), lsm(t1), lsm(t2)
    joint = lp1.exp()[:, None] * lp2.exp()
    sequence_kl = (joint * ((lp1 - lq1)[:, None] + lp2 - lq2)).sum()
    g_sequence = torch.cat([g.flatten() for g in torch.autograd.grad(sequence_kl, (a1, a2))])

    g_full = expected("full")
    torch.testing.assert_close(expected("sampled", 0.0), g_full, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(expected("sampled", 1.0), g_sequence, rtol=1e-10, atol=1e-13)
    assert rel(g_full, g_sequence) > 0.05  # the future term that discount 0 drops (measured 0.070)


def test_sampled_loss_by_hand():
    """Two responses (3 and 1 tokens, junk in the padding), eps 0.2 / 0.28, TIS cap 2; A = -w * delta:
    row 0 (w 1): delta 0.5, -0.3, 1.0 -> A -0.5, 0.3, -1.0 at ratios 1.0, 1.5, 0.7: terms 0.5 (live),
    -1.28 * 0.3 = -0.384 (clipped above), -0.8 * -1 = 0.8 (clipped below); row 1 (w 2): delta 0.25 -> A -0.5 at
    ratio 1.1 with pi_old / pi_rollout = 3 capped at 2: term 2 * 1.1 * 0.5 = 1.1. Loss (0.5 - 0.384 + 0.8 + 1.1) / 4
    tokens; d loss / d logprob = -w_tis * r * A / 4 on the live tokens, 0 on the clipped ones."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -9.0, -9.0]], dtype=F64)
    delta = torch.tensor([[0.5, -0.3, 1.0], [0.25, 7.0, 7.0]], dtype=F64)
    ratio = torch.tensor([[1.0, 1.5, 0.7], [1.1, 5.0, 5.0]], dtype=F64)
    lp = (old + ratio.log()).requires_grad_(True)
    rollout = old - torch.tensor([[0.0, 0.0, 0.0], [math.log(3.0), 0, 0]], dtype=F64)
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]], dtype=F64)
    x = DistillInputs(lp, old, rollout, old - delta, mask, torch.tensor([1.0, 2.0], dtype=F64))
    loss, kl, metrics = distill_loss(x, "sampled", CFG)
    loss.backward()
    assert loss.item() == pytest.approx((0.5 - 0.384 + 0.8 + 1.1) / 4, rel=1e-12)
    torch.testing.assert_close(lp.grad, torch.tensor([[0.5 / 4, 0, 0], [1.1 / 4, 0, 0]], dtype=F64),
                               rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(kl, delta * mask, rtol=0, atol=1e-15)  # per-token values: delta, 0 off the mask
    assert metrics["clip_frac"] == pytest.approx(0.5)


def test_discounted_advantages_by_hand():
    """discount 0.5: A_t = -w * (delta_t + 0.5 delta_t+1 + 0.25 delta_t+2); padding (junk deltas) adds nothing."""
    old = torch.zeros(2, 3, dtype=F64)
    teacher = -torch.tensor([[0.5, -0.3, 1.0], [0.25, 7.0, 7.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]], dtype=F64)
    adv = opd_advantages(old, teacher, mask, torch.tensor([1.0, 2.0], dtype=F64), discount=0.5)
    want = -torch.tensor([[0.5 - 0.15 + 0.25, -0.3 + 0.5, 1.0], [2 * 0.25, 0, 0]], dtype=F64)
    torch.testing.assert_close(adv, want, rtol=1e-12, atol=1e-15)
    plain = opd_advantages(old, teacher, mask, torch.tensor([1.0, 2.0], dtype=F64))
    torch.testing.assert_close(plain, -torch.tensor([[0.5, -0.3, 1.0], [0.5, 0, 0]], dtype=F64), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- topk, full
@pytest.mark.parametrize("scale", [2.5, 5.0])
def test_topk_approaches_full(scale):
    """V=1024 (logit scale 2.5: flat; 5: peaked like a trained LM), support = the teacher's top-k ++ the sampled
    token, through `distill_loss` as the trainer calls it: >= 0, at most `full`, non-decreasing in k, equal to it
    (value and gradient, 1e-10) at k=V; on the peaked toy the gradient is within 0.01 of `full`'s at k=128
    (measured 0.0014). Adding the student's top-16 to the teacher's top-16 recovers 0.97 of the KL (teacher's
    alone 0.72, peaked) - reverse KL lives where the student puts mass."""
    torch.manual_seed(3)
    V = 1024
    base = torch.randn(V, dtype=F64) * scale
    theta0, teacher = base + torch.randn(V, dtype=F64) * 0.8, base + torch.randn(V, dtype=F64) * 0.8
    lq = lsm(teacher)
    y = torch.multinomial(torch.softmax(theta0, -1), 1)

    def topk(support):
        return lambda th: distill_loss(one_position(th, y, lq, support), "topk", CFG)[0]

    full = float(reverse_kl(theta0, teacher, 1.0))
    g_full = grad_of(lambda th: reverse_kl(th, teacher, 1.0), theta0)
    values = []
    for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, V):
        values.append(float(topk(lq.topk(k).indices)(theta0)))
        assert -1e-15 <= values[-1] <= full + 1e-12, k
    assert all(b >= a - 1e-15 for a, b in zip(values, values[1:])), values
    assert values[-1] == pytest.approx(full, rel=1e-10)
    assert rel(grad_of(topk(lq.topk(V).indices), theta0), g_full) < 1e-10
    if scale == 5.0:
        assert rel(grad_of(topk(lq.topk(128).indices), theta0), g_full) < 0.01
        both = torch.cat([lq.topk(16).indices, lsm(theta0).topk(16).indices])
        assert float(topk(both)(theta0)) / full > 0.95 and float(topk(lq.topk(16).indices)(theta0)) / full < 0.8


def test_topk_and_full_by_hand():
    """p = (1/2, 1/4, 1/8, 1/8), q uniform over 4. Full: 1/2 ln 2 + 0 - 2/8 ln 2 = 1/4 ln 2.
    S = {0}: 1/2 ln 2 + tail (1/2) ln((1/2) / (3/4)) = 1/2 ln(4/3) (without the tail: 1/2 ln 2, more than the full KL).
    S = {0, 1}: the tail's ratio p/q is 1/2 on both its tokens, so coarse-graining loses nothing: 1/4 ln 2.
    Repeated ids count once."""
    lp = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=F64).log()
    lq = torch.full((4,), 0.25, dtype=F64).log()

    def topk(ids):
        ids = torch.tensor(ids)
        return float(topk_tail_reverse_kl(lp, ids, lq[ids]))

    assert float(full_reverse_kl(lp, lq)) == pytest.approx(0.25 * math.log(2), rel=1e-12)
    assert topk([0]) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    assert topk([0, 0, 0]) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    assert topk([1, 0, 1]) == pytest.approx(0.25 * math.log(2), rel=1e-12)
    assert topk([3, 2, 1, 0, 2]) == pytest.approx(0.25 * math.log(2), rel=1e-12)


def test_full_gradient_matches_float64_autograd_of_the_exact_kl():
    """`full` through `distill_loss`: value and gradient equal the float64 autograd of
    sum_{i,t} w_i sum_v p (log p - log q) / tokens, the reference written with softmax / log; padding (junk rows)
    adds nothing. Detaching p keeps log p's term, whose gradient sum_v p grad log p is 0."""
    torch.manual_seed(1)
    B, T, V, temp = 2, 3, 10, 0.7
    z = torch.randn(B, T, V, dtype=F64) * 2
    zt = z + torch.randn(B, T, V, dtype=F64)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]], dtype=F64)
    w = torch.tensor([1.5, 0.5], dtype=F64)
    y = torch.randint(V, (B, T, 1))

    def ours(zz):
        rows, trows = lsm(zz, temp), lsm(zt, temp)
        lp = rows.gather(-1, y)[..., 0]
        return distill_loss(DistillInputs(lp, lp.detach(), lp.detach(), trows.gather(-1, y)[..., 0], mask, w,
                                          student_rows=rows, teacher_rows=trows), "full", CFG)[0]

    def reference(zz):
        return (w[:, None] * reverse_kl(zz, zt, temp) * mask).sum() / mask.sum()

    assert float(ours(z)) == pytest.approx(float(reference(z)), rel=1e-12)
    g = grad_of(ours, z)
    torch.testing.assert_close(g, grad_of(reference, z), rtol=1e-10, atol=1e-13)
    assert g[mask.bool()].norm() > 0.1 and not g[1, 2].any()


# ------------------------------------------------------------------------------------------ every estimator
def _random_batch(temp=0.7, identical=False, seed=0):
    """B=3 responses of 5, 3 and 1 tokens (junk rows in the padding), V=16: student logits with grad, teacher logits
    (the same values when `identical`), sampled tokens, support = teacher top-4 ++ y ++ student top-4."""
    torch.manual_seed(seed)
    B, T, V = 3, 5, 16
    z = (torch.randn(B, T, V, dtype=F64) * 2).requires_grad_(True)
    zt = z.detach().clone() if identical else z.detach() + torch.randn(B, T, V, dtype=F64)
    rows, trows = lsm(z, temp), lsm(zt, temp)
    y = torch.multinomial(rows.detach().exp().view(-1, V), 1).view(B, T, 1)
    ids = torch.cat([trows.topk(4, -1).indices, y, rows.detach().topk(4, -1).indices], -1)
    mask = (torch.arange(T)[None, :] < torch.tensor([5, 3, 1])[:, None]).to(F64)
    lp = rows.gather(-1, y)[..., 0]
    x = DistillInputs(lp, lp.detach(), lp.detach(), trows.gather(-1, y)[..., 0], mask,
                      torch.tensor([1.0, 2.0, 0.5], dtype=F64), student_rows=rows, support_ids=ids,
                      teacher_support_logprobs=trows.gather(-1, ids), teacher_rows=trows)
    return z, x


@pytest.mark.parametrize("estimator", sorted(OPD_ESTIMATORS))
def test_identical_teacher_gives_zero_loss_and_gradient(estimator):
    """The teacher scored with the student's own logits at the same temperature: loss, per-token KL and gradient
    are 0 for every estimator (an undetached advantage gives a gradient of -grad log p per token here)."""
    z, x = _random_batch(identical=True)
    loss, kl, _ = distill_loss(x, estimator, CFG)
    (g,) = torch.autograd.grad(loss, z)
    assert abs(loss.item()) < 1e-12 and float(kl.abs().max()) < 1e-12 and float(g.norm()) < 1e-12


@pytest.mark.parametrize("estimator", sorted(OPD_ESTIMATORS))
def test_micro_batches_add_up_to_the_minibatch(estimator):
    """Micro-batches carrying the minibatch's token count sum to the minibatch's loss and gradient (gradient
    accumulation and data-parallel ranks give the same update)."""
    z, x = _random_batch()
    whole, kl, _ = distill_loss(x, estimator, CFG)
    (g_whole,) = torch.autograd.grad(whole, z, retain_graph=True)
    tokens = float(x.mask.sum())
    parts = []
    for idx in ([0], [1, 2]):
        parts.append(distill_loss(DistillInputs(
            x.logprobs[idx], x.old_logprobs[idx], x.rollout_logprobs[idx], x.teacher_logprobs[idx], x.mask[idx],
            x.weights[idx], x.student_rows[idx], x.support_ids[idx], x.teacher_support_logprobs[idx],
            x.teacher_rows[idx], tokens=tokens), estimator, CFG)[0])
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(sum(parts), z)[0], g_whole, rtol=1e-12, atol=1e-15)
    assert float(kl.abs().sum()) > 0 and not kl[2, 1:].any()


@pytest.mark.parametrize("estimator", sorted(OPD_ESTIMATORS))
def test_outcome_advantage_is_a_policy_gradient_beside_the_distillation(estimator):
    """An outcome advantage (group-normalised, scaled, per sequence) adds the token policy gradient of that advantage:
    for `sampled` inside the same loss (A_t = -w delta_t + A_out), for `topk` / `full` beside the KL loss. With the
    teacher equal to the student the distillation part is 0, so the loss is exactly the outcome's."""
    outcome = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
    z, x = _random_batch(identical=True)
    x.outcome_advantages = outcome
    loss, _, metrics = distill_loss(x, estimator, CFG)
    want, _ = token_pg_loss(LossInputs(x.logprobs, x.old_logprobs, x.rollout_logprobs, outcome, x.mask), CFG)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12) and want.item() != 0
    torch.testing.assert_close(torch.autograd.grad(loss, z, retain_graph=True)[0], torch.autograd.grad(want, z)[0],
                               rtol=1e-12, atol=1e-15)
    assert "clip_frac" in metrics


@pytest.mark.parametrize("estimator", sorted(OPD_ESTIMATORS))
def test_teacher_weight_scales_the_distillation(estimator):
    """w_i multiplies sample i's distillation loss: weights (1, 2, 0.5) equal the sum of the per-sample losses with
    weight 1 scaled by hand; a zero weight removes a sample's gradient."""
    z, x = _random_batch()
    loss = distill_loss(x, estimator, CFG)[0]
    parts = []
    for i, w in enumerate((1.0, 2.0, 0.5)):
        x.weights = torch.zeros(3, dtype=F64)
        x.weights[i] = 1.0
        parts.append(w * distill_loss(x, estimator, CFG)[0])
    assert loss.item() == pytest.approx(sum(parts).item(), rel=1e-12)
    x.weights = torch.tensor([1.0, 0.0, 1.0], dtype=F64)
    assert not torch.autograd.grad(distill_loss(x, estimator, CFG)[0], z)[0][1].any()


CLIP_OPTIONS = [dict(eps_low=0.2, eps_high=0.28, tis_cap=2.0), dict(eps_low=0.01, eps_high=0.01, tis_cap=1.0),
                dict(eps_low=0.5, eps_high=1.0, tis_cap=10.0)]


@pytest.mark.parametrize("clip", CLIP_OPTIONS)
def test_no_option_flips_the_distillation_direction(clip):
    """2000 random (student, teacher) states, V=16, with each clip setting the module offers: `topk` and `full` are
    >= 0 at every position and `topk` <= `full`; the gradient of `full` and the exact expected gradient of `sampled`
    (every token enumerated, weighted by p) have a positive inner product with grad KL at every position. `topk`
    follows grad KL once the support is large (teacher top-6 ++ y ++ student top-6 of 16: min cosine 0.65);
    with tiny supports the coarse KL's gradient can point elsewhere (k=1: 118 of 2000 states against grad KL) -
    a biased surrogate, still a divergence. A per-vocabulary clip (TRL #5990) makes the loss negative."""
    cfg = AlgorithmSection(loss="dapo", **clip)
    torch.manual_seed(4)
    P, V = 2000, 16
    a = torch.randn(P, V, dtype=F64) * 2
    teacher = a + torch.randn(P, V, dtype=F64)
    lq = lsm(teacher)
    g_kl = grad_of(lambda th: reverse_kl(th, teacher, 1.0).sum(), a)
    y = torch.multinomial(torch.softmax(a, -1), 1)

    def per_position(estimator, k):
        th = a.clone().requires_grad_(True)
        rows = lsm(th)[:, None]
        ids = torch.cat([lq.topk(k, -1).indices, y, rows.detach()[:, 0].topk(k, -1).indices], -1)[:, None]
        lp = rows[:, 0].gather(-1, y)
        x = DistillInputs(lp, lp.detach(), lp.detach(), lq.gather(-1, y), torch.ones(P, 1, dtype=F64),
                          torch.ones(P, dtype=F64), rows, ids, lq[:, None].gather(-1, ids), lq[:, None])
        loss, kl, _ = distill_loss(x, estimator, cfg)
        return kl[:, 0], torch.autograd.grad(loss, th)[0]

    full, g_full = per_position("full", 1)
    assert float(full.min()) >= 0 and float((g_full * g_kl).sum(-1).min()) > 0
    for k in (1, 3, 6, 8):
        topk, g_topk = per_position("topk", k)
        assert float(topk.min()) >= 0 and bool((topk <= full + 1e-12).all()), k
        if k >= 6:
            assert float((g_topk * g_kl).sum(-1).min()) > 0, k

    # sampled: every token v of every state, weighted by p(v) * (tokens), so the token mean is the expectation
    th = a.clone().requires_grad_(True)
    lp_all = lsm(th)
    lp = lp_all.reshape(-1, 1)
    x = DistillInputs(lp, lp.detach(), lp.detach(), lq.reshape(-1, 1), torch.ones(P * V, 1, dtype=F64),
                      lp_all.detach().exp().reshape(-1) * P * V)
    g_sampled = torch.autograd.grad(distill_loss(x, "sampled", cfg)[0], th)[0]
    torch.testing.assert_close(g_sampled, g_kl, rtol=1e-9, atol=1e-12)  # on-policy: exact, clip inactive
    assert float((g_sampled * g_kl).sum(-1).min()) > 0


# ---------------------------------------------------------------------------------- interfaces and metrics
def test_per_token_advantages_in_the_policy_losses():
    """The token-ratio losses take [B, T] advantages: a per-sequence advantage broadcast to [B, T] gives the [B]
    result exactly; GSPO's sequence ratio refuses them in one line."""
    torch.manual_seed(2)
    lp = torch.randn(3, 4, dtype=F64).requires_grad_(True)
    old, mask = lp.detach() - 0.1 * torch.randn(3, 4, dtype=F64), torch.tensor([[1.0] * 4, [1, 1, 0, 0], [1, 0, 0, 0]])
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    for loss in ("grpo", "dr_grpo", "dapo"):
        cfg = AlgorithmSection(loss=loss)
        a, _ = policy_loss(LossInputs(lp, old, old, adv, mask), cfg)
        b, _ = policy_loss(LossInputs(lp, old, old, adv[:, None].expand(3, 4), mask), cfg)
        assert a.item() == pytest.approx(b.item(), rel=1e-12)
        torch.testing.assert_close(torch.autograd.grad(a, lp)[0], torch.autograd.grad(b, lp)[0])
    with pytest.raises(ValueError, match="gspo takes one advantage per sequence"):
        policy_loss(LossInputs(lp, old, old, adv[:, None].expand(3, 4), mask), AlgorithmSection(loss="gspo"))


def test_opd_metrics_per_teacher():
    """Token means over each teacher's own tokens; a teacher without samples reports 0 tokens and no KL."""
    kl = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0], [5.0, 5.0, 5.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=F64)
    m = opd_metrics(kl, mask, torch.tensor([0, 1, 0]), ["math", "instruct", "code"])
    assert m == {"opd/reverse_kl": pytest.approx(21 / 6), "opd/math/tokens": 5.0, "opd/math/reverse_kl": 18 / 5,
                 "opd/instruct/tokens": 1.0, "opd/instruct/reverse_kl": 3.0, "opd/code/tokens": 0.0}


def test_bad_input_named():
    _, x = _random_batch()
    with pytest.raises(ValueError, match="opd.estimator='forward'"):
        distill_loss(x, "forward", CFG)
    with pytest.raises(ValueError, match="opd.discount=1.0 applies to the sampled estimator only"):
        distill_loss(x, "full", CFG, discount=1.0)
    x.support_ids = None
    with pytest.raises(ValueError, match="DistillInputs.support_ids"):
        distill_loss(x, "topk", CFG)
