"""`apply_compile`: the compiled model trains exactly like the eager one, across batch shapes."""

import copy

import torch
from torch import nn
from torch._dynamo.utils import counters

from dspost.model import apply_compile
from tests.model.conftest import random_model, small_args


def loss_and_grads(model, ids, segments=None):
    model.zero_grad()
    out = model(ids, labels=ids, segment_ids=segments)
    (out.lm_loss + sum(out.mtp_losses)).backward()
    return out.lm_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_model_matches_eager_loss_and_gradients_across_shapes():
    eager = random_model(small_args()).train()
    compiled = copy.deepcopy(eager)
    assert apply_compile(compiled) > 0
    g = torch.Generator().manual_seed(0)
    # Two batch shapes (the second recompiles, dynamic) and a packed batch with block-diagonal segments.
    batches = [(torch.randint(3, 97, (2, 16), generator=g), None),
               (torch.randint(3, 97, (3, 24), generator=g), None),
               (torch.randint(3, 97, (2, 24), generator=g), torch.tensor([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4]))]
    torch._dynamo.reset()  # graphs cached by earlier tests would let a no-op compile pass unseen
    graphs = counters["stats"]["unique_graphs"]
    for ids, segments in batches:
        loss_e, grads_e = loss_and_grads(eager, ids, segments)
        loss_c, grads_c = loss_and_grads(compiled, ids, segments)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
        assert grads_c.keys() == grads_e.keys()
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled path really ran


def test_compile_finds_nothing_outside_our_model():
    assert apply_compile(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) == 0
