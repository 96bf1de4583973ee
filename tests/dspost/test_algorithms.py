"""Losses and advantages: pure functions, and one trainer update moving probability the right way."""

import math

import pytest
import torch

from dspost.algorithms import (ADVANTAGES, LOSSES, LossInputs, group_centred, group_normalised,
                               informative_groups, kl_k1, kl_k2, kl_k3, overlong_penalty, policy_loss)
from dspost.config import AlgorithmSection


def test_advantages():
    r = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1])
    assert torch.allclose(group_centred(r, 4), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    a = group_normalised(r, 4)
    assert torch.allclose(a[:4].mean(), torch.tensor(0.0)) and a[0] > 0 and torch.all(a[4:] == 0)
    assert informative_groups(r, 4).tolist() == [True] * 4 + [False] * 4


def test_overlong_penalty():
    out = overlong_penalty(torch.tensor([10.0, 48, 56, 64, 70]), max_tokens=64, cache=16)
    assert torch.allclose(out, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    assert torch.allclose(kl_k1(lp, ref), torch.tensor([0.5, 0.0]))
    assert torch.allclose(kl_k2(lp, ref), torch.tensor([0.125, 0.0]))
    assert torch.allclose(kl_k3(lp, ref), torch.exp(torch.tensor([-0.5, 0.0])) - torch.tensor([-0.5, 0.0]) - 1)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_gradient_raises_positive_and_lowers_negative_samples(loss):
    torch.manual_seed(0)
    logits = torch.randn(4, 6, requires_grad=True)
    lp = logits.log_softmax(-1)
    mask = torch.ones(4, 6)
    x = LossInputs(lp, lp.detach(), lp.detach(), torch.tensor([1.0, -1.0, 1.0, -1.0]), mask)
    out, metrics = policy_loss(x, AlgorithmSection(loss=loss))
    out.backward()
    # d loss / d logprob < 0 for positive advantages (gradient descent raises them), > 0 for negative
    g = torch.autograd.grad(policy_loss(LossInputs(lp, lp.detach(), lp.detach(), x.advantages, mask),
                                        AlgorithmSection(loss=loss))[0], lp)[0]
    assert torch.all(g[0] < 0) and torch.all(g[1] > 0)
    assert "clip_frac" in metrics


def test_clipping_stops_gradient_outside_the_range():
    lp = torch.zeros(1, 3, requires_grad=True)
    old = torch.full((1, 3), -1.0)  # ratio e ~ 2.7 > 1 + eps_high
    x = LossInputs(lp, old, old, torch.tensor([1.0]), torch.ones(1, 3))
    loss, m = policy_loss(x, AlgorithmSection(loss="grpo"))
    loss.backward()
    assert torch.all(lp.grad == 0) and m["clip_frac"] == 1.0


def test_kl_penalty_added_with_beta():
    lp = torch.zeros(1, 2, requires_grad=True)
    x = LossInputs(lp, lp.detach(), lp.detach(), torch.tensor([0.0]), torch.ones(1, 2), torch.full((1, 2), -1.0))
    loss, m = policy_loss(x, AlgorithmSection(loss="grpo", kl_beta=0.5))
    assert m["kl"] > 0 and loss > 0


def test_entropy_bonus_flattens_the_policy():
    logits = torch.tensor([[[3.0, 0.0, -1.0]] * 2], requires_grad=True)  # [1, 2 tokens, vocab 3]
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    lp = logp[..., 0]
    x = LossInputs(lp, lp.detach(), lp.detach(), torch.tensor([0.0]), torch.ones(1, 2), entropy=entropy)
    loss, _ = policy_loss(x, AlgorithmSection(loss="grpo", entropy_coef=0.1))
    loss.backward()
    # zero advantage: only the bonus acts, and descending it moves mass off the top token
    assert logits.grad[0, :, 0].gt(0).all() and logits.grad[0, :, 2].lt(0).all()
    with pytest.raises(ValueError, match="entropy_coef"):
        policy_loss(LossInputs(lp, lp.detach(), lp.detach(), torch.tensor([0.0]), torch.ones(1, 2),
                               entropy=entropy.detach()), AlgorithmSection(entropy_coef=0.1))


def test_advantage_registry_matches_losses():
    assert set(ADVANTAGES) == set(LOSSES)


def test_packed_update_forward_matches_the_padded_one():
    from dspost.model import DeepseekV3, tiny_math
    from dspost.trainer_worker import RolloutBatch, pack, packed_logprobs, token_logprobs

    torch.manual_seed(0)
    model = DeepseekV3(tiny_math(num_hidden_layers=2)).init_weights(0).eval()
    lens = [(5, 3), (7, 20), (4, 1), (6, 9), (30, 40)]  # the last is longer than a row: a row of its own
    rand = lambda n: torch.randint(3, 1000, (n,)).tolist()  # noqa: E731
    batch = RolloutBatch([rand(p) for p, _ in lens], [rand(r) for _, r in lens], [[0.0] * r for _, r in lens],
                         [0.0] * len(lens))
    x = pack(batch, 0)
    with torch.no_grad():
        want_lp, want_ent = token_logprobs(model, x["ids"])
        got_lp, got_ent = packed_logprobs(model, x["ids"], x["lengths"], row_len=48)
    m = x["mask"].bool()
    assert m.sum() == sum(r for _, r in lens)
    torch.testing.assert_close(got_lp[m], want_lp[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(got_ent[m], want_ent[m], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------------
# Value and gradient tests against the papers' formulas, written out token by token in plain Python (no shared
# code with dspost.algorithms). The case is chosen so that every token of `RATIO` sits in a named regime of the
# clipped objective, rows have different lengths (token vs sequence means differ), padding holds junk (the mask
# must act), and some trainer/rollout weights exceed the TIS cap.
CFG = dict(eps_low=0.2, eps_high=0.28, tis_cap=2.0)
RATIO = [[1.1, 1.25, 1.4, 0.7, 9.0],  # A > 0: inside; in (1+eps_low, 1+eps_high] (clip-higher keeps it); clipped;
         [0.75, 1.3, 9.0, 9.0, 9.0],  # below 1-eps. A < 0: in [1-eps_high, 1-eps_low) (clipped at 1-eps_low); above
         [0.9, 1.0, 1.27, 9.0, 9.0],  # 1+eps (not clipped). A > 0.
         [0.6, 9.0, 9.0, 9.0, 9.0]]  # A < 0: clipped
ADV = [1.0, -0.5, 2.0, -1.0]
LENGTHS = [4, 2, 3, 1]  # padded to W = 5 columns: Dr. GRPO's constant normaliser is B * W
W = 5
OLD_OVER_ROLLOUT = [[1.0, 3.0, 0.8, 1.0, 1.0], [2.5, 0.9, 1.0, 1.0, 1.0], [1.0, 1.0, 1.5, 1.0, 1.0],
                    [0.5, 1.0, 1.0, 1.0, 1.0]]


def _case(old_requires_grad=False):
    """LossInputs for the case above: logprobs (a leaf with grad), old and rollout logprobs."""
    lp = torch.tensor([[-1.0, -0.5, -2.0, -1.5, -0.1]] * 4, dtype=torch.float64)
    old = (lp - torch.tensor(RATIO, dtype=torch.float64).log()).clone().requires_grad_(old_requires_grad)
    rollout = old.detach() - torch.tensor(OLD_OVER_ROLLOUT, dtype=torch.float64).log()
    mask = (torch.arange(W)[None, :] < torch.tensor(LENGTHS)[:, None]).double()
    return LossInputs(lp.requires_grad_(), old, rollout, torch.tensor(ADV, dtype=torch.float64), mask)


def _ppo_objective(r: float, a: float, lo: float, hi: float) -> tuple[float, float]:
    """min(r A, clip(r, 1-lo, 1+hi) A) written per sign of A (PPO), and its derivative in r."""
    if a >= 0:
        return min(r, 1 + hi) * a, (a if r < 1 + hi else 0.0)
    return max(r, 1 - lo) * a, (a if r > 1 - lo else 0.0)


def _token_loss_reference(norm: str, eps_low=0.2, eps_high=0.28, cap=2.0):
    """Expected loss and d loss / d logprobs [4, W] for the token-ratio losses: per-token term
    -w * objective with w = min(pi_old / pi_rollout, cap); `norm` picks the paper's normaliser."""
    terms, grads = {}, {}
    for i, n in enumerate(LENGTHS):
        for t in range(n):
            r, w = RATIO[i][t], min(OLD_OVER_ROLLOUT[i][t], cap)
            obj, dobj = _ppo_objective(r, ADV[i], eps_low, eps_high)
            terms[i, t], grads[i, t] = -w * obj, -w * dobj * r  # d r / d logprob = r
    tokens = sum(LENGTHS)
    weight = {"grpo": lambda i: 1 / (len(LENGTHS) * LENGTHS[i]),  # mean per sequence, then over sequences
              "dapo": lambda i: 1 / tokens,  # one mean over every token of the batch
              "dr_grpo": lambda i: 1 / (len(LENGTHS) * W)}[norm]  # constant: B x the padded length
    loss = sum(weight(i) * v for (i, _), v in terms.items())
    grad = torch.zeros(4, W, dtype=torch.float64)
    for (i, t), g in grads.items():
        grad[i, t] = weight(i) * g
    return loss, grad


@pytest.mark.parametrize("loss", ["grpo", "dapo", "dr_grpo"])
def test_token_ratio_losses_match_their_papers_in_value_and_gradient(loss):
    x = _case()
    got, metrics = policy_loss(x, AlgorithmSection(loss=loss, **CFG))
    got.backward()
    want, want_grad = _token_loss_reference(loss)
    assert got.item() == pytest.approx(want, rel=1e-12)
    torch.testing.assert_close(x.logprobs.grad, want_grad, rtol=1e-12, atol=1e-15)
    # clipped tokens: row 0 token 2 (r 1.4 > 1.28, A > 0), row 1 token 0 (r 0.75 < 0.8, A < 0), row 3 (r 0.6)
    assert metrics["clip_frac"] == pytest.approx(3 / 10)
    # the case tells the normalisations apart: another loss's formula is off by more than 0.05
    assert all(abs(_token_loss_reference(other)[0] - want) > 0.05 for other in {"grpo", "dapo", "dr_grpo"} - {loss})


def test_hand_computed_token_terms():
    """Three tokens worked by hand, as a check on the reference itself (eps_low 0.2, eps_high 0.28, cap 2):
    row 0 token 1: r 1.25 < 1.28 is not clipped with clip-higher, w min(3, 2) = 2: term -2 * 1.25 * 1 = -2.5;
    row 1 token 0: A -0.5, r 0.75 < 0.8 is clipped to 0.8, w 2 (2.5 capped): term -2 * 0.8 * -0.5 = 0.8, no grad;
    row 3: A -1, r 0.6 clipped to 0.8, w 0.5: term 0.4. GRPO: row means, then the mean over 4 rows."""
    x = _case()
    loss, _ = policy_loss(x, AlgorithmSection(loss="grpo", **CFG))
    loss.backward()
    assert x.logprobs.grad[0, 1] == pytest.approx(-2.5 / 16)  # d(-w r A)/d logprob / (B * n) = -2 * 1.25 / (4 * 4)
    assert x.logprobs.grad[1, 0] == 0 and x.logprobs.grad[3, 0] == 0
    row3 = 0.4 / 4  # row 3 has one token
    without_row3 = _token_loss_reference("grpo")[0] - row3
    assert loss.item() - without_row3 == pytest.approx(0.1)


@pytest.mark.parametrize("loss", ["grpo", "dapo", "dr_grpo"])
def test_clip_higher_acts_on_the_side_of_the_advantage(loss):
    """eps_high bounds the ratio from above for positive advantages, eps_low from below for negative ones:
    with eps_low=0.2, eps_high=0.28 the A > 0 token at r = 1.25 keeps its gradient and the A < 0 token at
    r = 0.75 loses it; symmetric eps 0.2 clips the first, symmetric 0.28 frees the second."""
    def grad(lo, hi):
        x = _case()
        policy_loss(x, AlgorithmSection(loss=loss, eps_low=lo, eps_high=hi, tis_cap=2.0))[0].backward()
        return x.logprobs.grad

    g = grad(0.2, 0.28)
    assert g[0, 1] < 0 and g[1, 0] == 0
    assert grad(0.2, 0.2)[0, 1] == 0 and grad(0.28, 0.28)[1, 0] != 0
    torch.testing.assert_close(g, _token_loss_reference(loss, 0.2, 0.28)[1], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad(0.1, 0.5), _token_loss_reference(loss, 0.1, 0.5)[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss", ["grpo", "dapo", "dr_grpo"])
def test_tis_weight_is_capped_and_detached(loss):
    """w = min(pi_old / pi_rollout, cap) multiplies each token term as a constant. One token by hand: A = 1,
    pi = pi_old, pi_old / pi_rollout = 3: the loss is -min(3, cap) = -2 at cap 2 and -3 at cap 10. In the case
    above, the gradient reaching pi_old is the ratio's alone: minus the logprobs' gradient."""
    lp = torch.tensor([[-1.0]], dtype=torch.float64)
    ones = torch.ones(1, 1, dtype=torch.float64)
    one = LossInputs(lp, lp, lp - math.log(3.0), ones[0], ones)
    for cap, want in ((2.0, -2.0), (10.0, -3.0)):
        assert policy_loss(one, AlgorithmSection(loss=loss, tis_cap=cap))[0].item() == pytest.approx(want, rel=1e-12)
    x = _case(old_requires_grad=True)
    policy_loss(x, AlgorithmSection(loss=loss, **CFG))[0].backward()
    torch.testing.assert_close(x.old_logprobs.grad, -x.logprobs.grad, rtol=1e-12, atol=1e-15)


# GSPO: per-token log-ratios chosen so that each sequence's length-normalised ratio s lands in one regime.
GSPO_CFG = dict(seq_eps_low=0.02, seq_eps_high=0.05, tis_cap=2.0)
GSPO_LOG_RATIO = [[0.03, 0.01, 0.04, 0.04],  # A > 0, s = e^0.03 = 1.030 inside; un-normalised e^0.12 = 1.13 is not
                  [0.10, 0.06, 0.0, 0.0],  # A > 0, s = e^0.08 = 1.083 > 1.05: clipped (token eps 0.28 would not)
                  [-0.05, -0.01, -0.03, 0.0],  # A < 0, s = e^-0.03 = 0.970 < 0.98: clipped
                  [0.02, 0.0, 0.0, 0.0]]  # A < 0, s = e^0.02 = 1.020: inside
GSPO_ADV = [1.0, 0.5, -1.0, -2.0]
GSPO_LENGTHS = [4, 2, 3, 1]
GSPO_OLD_OVER_ROLLOUT = [[1.0] * 4, [1.0] * 4, [1.0] * 4, [1.0, 5.0, 5.0, 5.0]]  # junk in row 3's padding


def _gspo_case(w=GSPO_OLD_OVER_ROLLOUT):
    lp = torch.tensor([[-1.0, -0.5, -2.0, -1.5]] * 4, dtype=torch.float64)
    old = lp - torch.tensor(GSPO_LOG_RATIO, dtype=torch.float64)
    rollout = old - torch.tensor(w, dtype=torch.float64).log()
    mask = (torch.arange(4)[None, :] < torch.tensor(GSPO_LENGTHS)[:, None]).double()
    return LossInputs(lp.requires_grad_(), old, rollout, torch.tensor(GSPO_ADV, dtype=torch.float64), mask)


def _gspo_reference(w=GSPO_OLD_OVER_ROLLOUT, lo=0.02, hi=0.05, cap=2.0):
    """GSPO (arXiv 2507.18071): s_i = exp(mean_t log r_it) (here with the capped trainer/rollout weight's mean
    log folded in), loss -(1/B) sum_i min(s_i A_i, clip(s_i) A_i); d s_i / d logprob_it = s_i / |o_i|."""
    B = len(GSPO_LENGTHS)
    loss, grad = 0.0, torch.zeros(4, 4, dtype=torch.float64)
    for i, n in enumerate(GSPO_LENGTHS):
        s = math.exp(sum(GSPO_LOG_RATIO[i][:n]) / n + sum(math.log(min(v, cap)) for v in w[i][:n]) / n)
        obj, dobj = _ppo_objective(s, GSPO_ADV[i], lo, hi)
        loss -= obj / B
        grad[i, :n] = -dobj * s / n / B
    return loss, grad


def test_gspo_sequence_ratio_and_clipping_match_the_paper():
    x = _gspo_case()
    got, metrics = policy_loss(x, AlgorithmSection(loss="gspo", **GSPO_CFG))
    got.backward()
    want, want_grad = _gspo_reference()
    assert got.item() == pytest.approx(want, rel=1e-12)
    torch.testing.assert_close(x.logprobs.grad, want_grad, rtol=1e-12, atol=1e-15)
    # rows 1 and 2 are clipped: no gradient; rows 0 and 3 spread s_i A_i / |o_i| evenly over their tokens
    assert metrics["clip_frac"] == pytest.approx(0.5)
    assert not x.logprobs.grad[1].any() and not x.logprobs.grad[2].any()
    assert x.logprobs.grad[0, 0] == pytest.approx(-math.exp(0.03) / 4 / 4)
    assert x.logprobs.grad[3, 0] == pytest.approx(2 * math.exp(0.02) / 4)


def test_gspo_folds_the_capped_rollout_weight_into_the_sequence_ratio():
    """With pi_old / pi_rollout = e^0.04 on every token of row 0, s = e^0.07 > 1 + seq_eps_high: clipped."""
    w = [[math.exp(0.04)] * 4] + GSPO_OLD_OVER_ROLLOUT[1:]
    x = _gspo_case(w)
    got, _ = policy_loss(x, AlgorithmSection(loss="gspo", **GSPO_CFG))
    got.backward()
    want, want_grad = _gspo_reference(w)
    assert got.item() == pytest.approx(want, rel=1e-12) and not x.logprobs.grad[0].any()
    torch.testing.assert_close(x.logprobs.grad, want_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("estimator, value, slope", [
    ("k1", lambda d: -d, lambda d: 1.0),  # d = log pi_ref - log pi
    ("k2", lambda d: 0.5 * d * d, lambda d: -d),
    ("k3", lambda d: math.exp(d) - d - 1, lambda d: 1 - math.exp(d)),  # Schulman's k3 = rho - 1 - log rho
])
def test_kl_penalty_value_and_gradient(estimator, value, slope):
    """policy_loss adds beta * (token mean of the estimator) to the policy loss; zero advantages isolate it."""
    beta = 0.3
    lp = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -3.0, 7.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -0.5, -1.0], [-0.7, -1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]], dtype=torch.float64)
    x = LossInputs(lp, lp.detach(), lp.detach(), torch.zeros(2, dtype=torch.float64), mask, ref)
    loss, metrics = policy_loss(x, AlgorithmSection(loss="grpo", kl_beta=beta, kl_estimator=estimator))
    loss.backward()
    d = [[r - p for r, p in zip(rr, pr)] for rr, pr in zip(ref.tolist(), lp.tolist())]
    cells = [(i, t) for i in range(2) for t in range(3) if mask[i, t]]
    kl = sum(value(d[i][t]) for i, t in cells) / len(cells)
    assert metrics["kl"] == pytest.approx(kl, rel=1e-12) and loss.item() == pytest.approx(beta * kl, rel=1e-12)
    want = torch.zeros(2, 3, dtype=torch.float64)
    for i, t in cells:
        want[i, t] = beta * slope(d[i][t]) / len(cells)
    torch.testing.assert_close(lp.grad, want, rtol=1e-12, atol=1e-15)


def test_kl_k3_by_hand():
    # log pi = -1, log pi_ref = -1.5: rho = e^-0.5 = 0.60653, k3 = 0.60653 - 1 + 0.5 = 0.10653
    lp = torch.tensor([[-1.0]], dtype=torch.float64)
    x = LossInputs(lp, lp, lp, torch.zeros(1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64),
                   torch.tensor([[-1.5]], dtype=torch.float64))
    _, metrics = policy_loss(x, AlgorithmSection(loss="dapo", kl_beta=1.0, kl_estimator="k3"))
    assert metrics["kl"] == pytest.approx(0.1065307, abs=1e-7)


@pytest.mark.parametrize("loss", ["grpo", "gspo"])
def test_entropy_bonus_value_and_gradient(loss):
    """The loss subtracts entropy_coef * token mean of the entropy: d loss / d entropy = -coef / tokens."""
    x = _case()
    base = policy_loss(x, AlgorithmSection(loss=loss, **CFG))[0].item()
    entropy = torch.tensor([[0.5, 1.0, 2.0, 9.0, 9.0]] * 4, dtype=torch.float64, requires_grad=True)
    x.entropy = entropy
    got = policy_loss(x, AlgorithmSection(loss=loss, entropy_coef=0.1, **CFG))[0]
    got.backward()
    mean = sum(sum([0.5, 1.0, 2.0, 9.0][:n]) for n in LENGTHS) / sum(LENGTHS)
    assert got.item() == pytest.approx(base - 0.1 * mean, rel=1e-12)
    torch.testing.assert_close(entropy.grad, -0.1 * x.mask / sum(LENGTHS), rtol=1e-12, atol=0)


def test_advantage_estimators_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.5, 1.0, 0.5])
    # group 1: mean 0.5, sample std sqrt(1/3); group 2: mean 0.5, sample std sqrt(0.5/3)
    s1, s2 = math.sqrt(1 / 3), math.sqrt(0.5 / 3)
    normalised = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, -0.5 / s2, 0.0, 0.5 / s2, 0.0]
    centred = [0.5, -0.5, -0.5, 0.5, -0.5, 0.0, 0.5, 0.0]
    for name in ("grpo", "dapo", "gspo"):
        assert ADVANTAGES[name](r, 4).tolist() == pytest.approx(normalised, rel=1e-5), name
    assert ADVANTAGES["dr_grpo"](r, 4).tolist() == pytest.approx(centred, abs=1e-7)
