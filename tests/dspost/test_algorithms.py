"""Losses and advantages: pure functions, and one trainer update moving probability the right way."""

import pytest
import torch

from dspost.algorithms import (ADVANTAGES, LOSSES, LossInputs, group_centred, group_normalised,
                               informative_groups, kl_k1, kl_k2, kl_k3, overlong_penalty, policy_loss)
from dspost.config import AlgorithmSection, TrainerSection


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


def test_packed_logprobs_at_the_response_positions_give_the_same_values_and_gradients():
    """The update runs the head on response positions only: same logprobs there, 0 elsewhere, same gradients."""
    from dspost.model import DeepseekV3, tiny_math
    from dspost.trainer_worker import RolloutBatch, pack, packed_logprobs

    torch.manual_seed(0)
    model = DeepseekV3(tiny_math(num_hidden_layers=2)).init_weights(0).train()
    lens = [(5, 3), (7, 20), (4, 1), (6, 9)]
    rand = lambda n: torch.randint(3, 1000, (n,)).tolist()  # noqa: E731
    x = pack(RolloutBatch([rand(p) for p, _ in lens], [rand(r) for _, r in lens], [[0.0] * r for _, r in lens],
                          [0.0] * len(lens)), 0)
    m = x["mask"].bool()

    def run(**kw):
        model.zero_grad()
        lp, ent = packed_logprobs(model, x["ids"], x["lengths"], row_len=32, **kw)
        (lp * x["mask"]).sum().backward()
        return lp, ent, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (lp_all, ent_all, g_all), (lp, ent, g) = run(), run(at=x["mask"])
    torch.testing.assert_close(lp[m], lp_all[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[m], ent_all[m], atol=1e-5, rtol=0)
    assert not lp[~m].any() and lp_all[~m & (torch.arange(lp.shape[1]) < x["lengths"][:, None] - 1)].all()
    assert len(g) == len(g_all)
    for a, b in zip(g, g_all):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", ["gspo", "grpo"])
def test_trainer_update_moves_probability_towards_rewarded_samples(tmp_path, loss):
    from dspost.config import ModelSection
    from dspost.model import DeepseekV3, tiny_math
    from dspost.models import tiny_math_init
    from dspost.trainer_worker import RolloutBatch, TrainerWorker, pack, token_logprobs

    path = tiny_math_init()
    cfg = {"trainer": TrainerSection(lr=1e-3, warmup_steps=0).model_dump(),
           "algorithm": AlgorithmSection(loss=loss).model_dump(), "model": ModelSection(bias_update_speed=0).model_dump()}
    worker = TrainerWorker(str(path), cfg)
    prompt = [4, 100, 101, 102, 5]
    good, bad = [200, 201, 202, 2], [300, 301, 302, 2]
    batch = RolloutBatch([prompt] * 4, [good, bad, good, bad], [[0.0] * 4] * 4, [1.0, -1.0, 1.0, -1.0])
    x = pack(batch, 0)

    def seq_lp():
        with torch.no_grad():
            lp, _ = token_logprobs(worker.model.eval(), x["ids"])
        return (lp * x["mask"]).sum(1)

    before = seq_lp()
    batch.rollout_logprobs = [[float(v) for v in row[m.bool()]] for row, m in
                              zip(token_logprobs(worker.model, x["ids"])[0].detach(), x["mask"])]
    worker.train_step(batch)
    after = seq_lp()
    assert after[0] > before[0] and after[1] < before[1]


def test_compiled_trainer_update_matches_the_eager_one():
    from torch._dynamo.utils import counters

    from dspost.config import ModelSection
    from dspost.models import tiny_math_init
    from dspost.trainer_worker import RolloutBatch, TrainerWorker

    path = str(tiny_math_init())
    workers = [TrainerWorker(path, {"trainer": TrainerSection(lr=1e-3, warmup_steps=0, compile=c).model_dump(),
                                    "algorithm": AlgorithmSection().model_dump(),
                                    "model": ModelSection(bias_update_speed=0).model_dump()}) for c in (False, True)]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (5, 9, 7, 12)]
    responses = [torch.randint(5, 300, (n,), generator=g).tolist() + [2] for n in (3, 20, 11, 6)]
    batch = RolloutBatch(prompts, responses, [[-1.0] * len(r) for r in responses], [1.0, -1.0, 0.5, -0.5])
    torch._dynamo.reset()  # graphs cached by earlier tests would let a no-op compile pass unseen
    graphs = counters["stats"]["unique_graphs"]
    eager, compiled = (w.train_step(batch) for w in workers)
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled path really ran
    for key in ("train/loss", "train/grad_norm", "entropy"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key
    after = [w.sequence_logprobs([p + r for p, r in zip(prompts, responses)]) for w in workers]
    for got, want in zip(*after):
        assert got == pytest.approx(want, abs=1e-4)


def test_trainer_computes_logprobs_at_the_rollout_temperature():
    from dspost.config import ModelSection
    from dspost.model import from_pretrained
    from dspost.models import tiny_math_init
    from dspost.trainer_worker import RolloutBatch, TrainerWorker, pack, token_logprobs

    cfg = {"trainer": TrainerSection(lr=1e-3, warmup_steps=0).model_dump(), "algorithm": AlgorithmSection().model_dump(),
           "model": ModelSection(bias_update_speed=0).model_dump(), "temperature": 0.7}
    prompts, responses = [[4, 100, 101, 5], [4, 102, 5]], [[200, 201, 2], [300, 301, 302, 303, 2]]

    model = from_pretrained(tiny_math_init()).eval()

    def batch(temperature):
        x = pack(RolloutBatch(prompts, responses, [[0.0] * len(r) for r in responses], [1.0, -1.0]), 0)
        with torch.no_grad():
            lp = token_logprobs(model, x["ids"], temperature=temperature)[0]
        return RolloutBatch(prompts, responses, [row[m.bool()].tolist() for row, m in zip(lp, x["mask"])], [1.0, -1.0])

    assert TrainerWorker(str(tiny_math_init()), cfg).train_step(batch(0.7))["train/rollout_logprob_diff"] < 1e-5
    assert TrainerWorker(str(tiny_math_init()), cfg).train_step(batch(1.0))["train/rollout_logprob_diff"] > 1e-2
