"""Router, balancing bias, V4 routing pieces, MTP loss and routing replay."""

import math

import pytest
import torch

from dspost.model import mtp_horizon_weights
from dspost.model.deepseek_v3 import Gate, sequence_balance_loss, swiglu
from tests.model.conftest import random_model, small_args


def make_gate(**kw) -> Gate:
    gate = Gate(small_args(**kw))
    torch.nn.init.normal_(gate.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    return gate


def test_group_limited_topk_excludes_masked_groups():
    args = small_args(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2)
    gate = Gate(args)
    s = torch.tensor([[0.9, 0.1, 0.5, 0.6, 0.95, 0.0, 0.2, 0.3]])  # group sums: 1.0, 1.1, 0.95, 0.5
    idx = gate.select(s)
    assert sorted(idx[0].tolist()) == [2, 3]  # the best group (experts 2, 3), not the single best experts 4 and 0


def test_bias_selects_but_does_not_weight():
    gate = make_gate(n_group=1, topk_group=1)
    x = torch.randn(16, gate.args.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gate.e_score_correction_bias[5] = 10.0  # forces expert 5 into every token's top-k
    w, idx, s = gate(x)
    assert (idx == 5).any(-1).all()
    expected = s.gather(1, idx)
    expected = expected / expected.sum(-1, keepdim=True) * gate.args.routed_scaling_factor
    assert torch.allclose(w, expected)  # weights from the unbiased scores


def test_scoring_functions():
    x = torch.randn(4, 64)
    for func, fn in [("sigmoid", torch.sigmoid), ("softmax", lambda t: t.softmax(-1)),
                     ("sqrtsoftplus", lambda t: torch.nn.functional.softplus(t).sqrt())]:
        gate = make_gate(scoring_func=func)
        logits = x @ gate.weight.t()
        assert torch.allclose(gate.scores(x), fn(logits), atol=1e-6)


def test_routing_weights_are_scaled_and_normalised():
    gate = make_gate(routed_scaling_factor=2.5)
    w, _, _ = gate(torch.randn(8, 64))
    assert torch.allclose(w.sum(-1), torch.full((8,), 2.5), atol=1e-5)


def test_hash_layers_route_by_token_id():
    args = small_args(num_hash_layers=1, first_k_dense_replace=1)
    model = random_model(args)
    hashed = model.model.layers[1].mlp.gate
    later = model.model.layers[2].mlp.gate
    assert hashed.hash_routed and not later.hash_routed
    ids = torch.tensor([[3, 3, 7, 3]])
    with torch.no_grad():
        model(ids)
    routes = model.routes()[0].view(4, -1)
    assert torch.equal(routes[0], hashed.tid2eid[3]) and torch.equal(routes[1], routes[3])
    assert torch.equal(routes[2], hashed.tid2eid[7])
    assert len(set(hashed.tid2eid[3].tolist())) == args.num_experts_per_tok


def test_bias_update_sign_rule():
    gate = make_gate()
    gate.load_E = torch.tensor([10.0, 0, 0, 0, 0, 0, 2, 4])
    gate.update_bias(0.001)
    mean = 2.0
    expected = 0.001 * torch.sign(mean - torch.tensor([10.0, 0, 0, 0, 0, 0, 2, 4]))
    assert torch.allclose(gate.e_score_correction_bias, expected)
    assert gate.load_E.sum() == 0  # counts restart after each update


def test_drift_correction_resets_corrective_part():
    gate = make_gate(drift_reset_interval=3)
    loads = [torch.tensor([9.0, 1, 1, 1, 1, 1, 1, 1]), torch.tensor([1.0, 9, 1, 1, 1, 1, 1, 1]),
             torch.tensor([9.0, 1, 1, 1, 1, 1, 1, 1])]
    for load in loads[:2]:
        gate.load_E = load.clone()
        gate.update_bias(0.01)
    assert gate.corrective_E.abs().sum() > 0
    gate.load_E = loads[2].clone()
    gate.update_bias(0.01)
    # After the reset only the stable part remains: one step by the window's total load.
    window = sum(loads)
    assert torch.allclose(gate.e_score_correction_bias, 0.01 * torch.sign(window.mean() - window))
    assert gate.corrective_E.abs().sum() == 0


def test_training_accumulates_load_and_balancing_moves_bias():
    model = random_model(small_args(), bias_std=0.0).train()
    ids = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids)
    before = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()]
    loads = model.expert_load()
    assert loads.shape == (2, 8) and torch.all(loads.sum(1) == 4 * 32 * 2)
    model.update_router_biases(0.001)
    after = [m.gate.e_score_correction_bias for m in model.moe_layers()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_sequence_balance_loss_matches_formula():
    s = torch.rand(2, 5, 8)
    idx = torch.randint(0, 8, (2, 5, 2))
    f = torch.zeros(2, 8)
    for b in range(2):
        for e in idx[b].flatten():
            f[b, e] += 1
    f = f * 8 / (2 * 5)
    p = (s / s.sum(-1, keepdim=True)).mean(1)
    assert torch.allclose(sequence_balance_loss(s, idx), (f * p).sum(-1).mean())


def test_swiglu_clamp():
    gate, up = torch.tensor([20.0, -20.0, 3.0]), torch.tensor([30.0, -30.0, 2.0])
    out = swiglu(gate, up, 10.0)
    ref = torch.nn.functional.silu(torch.tensor([10.0, -20.0, 3.0])) * torch.tensor([10.0, -10.0, 2.0])
    assert torch.allclose(out, ref)
    assert torch.equal(swiglu(gate, up, None), torch.nn.functional.silu(gate) * up)


def test_routing_replay_uses_given_experts_and_keeps_router_gradients():
    model = random_model(small_args()).train()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids)
    own = model.routes()
    forced = [torch.full_like(r, 0).index_fill_(1, torch.tensor([1]), 1) for r in own]  # experts {0, 1}
    out = model(ids, labels=ids, routes=forced)
    assert all(torch.equal(a, b) for a, b in zip(model.routes(), forced))
    out.loss.backward()
    assert all(m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0 for m in model.moe_layers())


def test_mtp_loss_targets_shifted_tokens():
    args = small_args(num_nextn_predict_layers=2, mtp_offsets=(1, 3))
    model = random_model(args)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        out = model(ids, labels=labels)
        h = model(ids, return_hidden=True).hidden
        cos, sin = model.rope(torch.arange(12).expand(2, 12), h.dtype)
        mtp1, mtp2 = model.model.mtp_layers
        h1 = model._mtp_step(mtp1, h, ids, 1, cos, sin, None)
        h2 = model._mtp_step(mtp2, h1, ids, 3, cos, sin, None)
        logits1, logits2 = model.lm_head(mtp1.shared_head.norm(h1)), model.lm_head(mtp2.shared_head.norm(h2))
    # module k (offset o) predicts t+1+o: its labels are the next-token labels shifted left by o
    ce = torch.nn.functional.cross_entropy
    exp1 = ce(logits1.flatten(0, 1), torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).flatten(), ignore_index=-100)
    exp2 = ce(logits2.flatten(0, 1), torch.nn.functional.pad(labels[:, 3:], (0, 3), value=-100).flatten(), ignore_index=-100)
    assert torch.allclose(out.mtp_losses[0], exp1) and torch.allclose(out.mtp_losses[1], exp2)
    assert torch.allclose(out.loss, out.lm_loss + model.mtp_loss_weight * (exp1 + exp2) / 2)


def test_loss_without_logits_runs_the_head_on_targets_only():
    """`return_logits=False`: the same next-token and MTP losses and gradients, no logits."""
    model = random_model(small_args(num_nextn_predict_layers=2, mtp_offsets=(1, 2))).train()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    labels[:, :5] = -100  # a prompt without targets

    def run(**kw):
        model.zero_grad()
        out = model(ids, labels=labels, **kw)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (full, g_full), (lean, g_lean) = run(), run(return_logits=False)
    assert full.logits is not None and lean.logits is None
    torch.testing.assert_close(lean.lm_loss, full.lm_loss)
    torch.testing.assert_close(torch.stack(lean.mtp_losses), torch.stack(full.mtp_losses))
    assert len(g_lean) == len(g_full)
    for a, b in zip(g_lean, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_logits_at_runs_the_head_on_the_selected_positions_in_their_order():
    model = random_model(small_args()).eval()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        rows, cols = torch.tensor([1, 0, 1]), torch.tensor([7, 2, 0])
        torch.testing.assert_close(model(ids, logits_at=(rows, cols)).logits, full[rows, cols])
        keep = ids % 2 == 0
        torch.testing.assert_close(model(ids, logits_at=keep).logits, full[keep])
    with pytest.raises(ValueError, match="logits_at"):
        model(ids, labels=ids, logits_at=keep)


def test_staggered_mtp_schedule():
    args = small_args(num_nextn_predict_layers=3, mtp_offsets=(1, 2, 4), mtp_horizon_warmup=10)
    assert mtp_horizon_weights(args, 0) == [1.0, 0.0, 0.0]
    assert mtp_horizon_weights(args, 5) == [1.0, 0.5, 0.0]
    assert mtp_horizon_weights(args, 15) == [1.0, 1.0, 0.5]
    assert mtp_horizon_weights(args, 40) == [1.0, 1.0, 1.0]
    assert args.vllm_speculative_unsupported() and not small_args(num_nextn_predict_layers=2).vllm_speculative_unsupported()


def test_vllm_unsupported_features_are_marked(tmp_path):
    from dspost.model import CheckpointError, check_vllm_servable

    plain = random_model(small_args())
    plain.save_pretrained(tmp_path / "plain")
    check_vllm_servable(tmp_path / "plain")
    for kw in ({"num_hash_layers": 1}, {"swiglu_limit": 10.0}, {"scoring_func": "sqrtsoftplus"}):
        model = random_model(small_args(**kw))
        model.save_pretrained(tmp_path / "x")
        with pytest.raises(CheckpointError, match="vLLM cannot serve"):
            check_vllm_servable(tmp_path / "x")


def test_models_coexist_without_shared_state():
    a = random_model(small_args(swiglu_limit=5.0), seed=0)
    b = random_model(small_args(scoring_func="softmax", topk_method="greedy"), seed=0)
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
        assert torch.equal(a(ids).logits, la)  # b's construction changed nothing in a
    assert not torch.equal(la, lb)


def test_bf16_forward_backward():
    model = random_model(small_args()).to(torch.bfloat16).train()
    ids = torch.randint(0, 97, (2, 16))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and math.isfinite(out.loss.item())
    assert all(m.gate.e_score_correction_bias.dtype == torch.float32 for m in model.moe_layers())
