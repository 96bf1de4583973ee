"""FP8 / MXFP4 weights: DeepSeek-format checkpoints that transformers reads as we do, quantise-on-sync, and the
FP8 / FP4-QAT training modes."""

import json

import pytest
import torch

from dspost.model import CheckpointError, DeepseekV3, check_vllm_servable, from_pretrained, hf_tensors, tiny_math
from dspost.model.checkpoint import load_named, quantize_named, save_pretrained
from dspost.model.quant import Fp8Linear, apply_training_precision


@pytest.fixture(scope="module")
def model():
    # tiny-math widths (multiples of 128, as FP8 blocks want), two layers to stay quick.
    return DeepseekV3(tiny_math(num_hidden_layers=2, num_nextn_predict_layers=0)).init_weights(4).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(6, 1000, (2, 24), generator=torch.Generator().manual_seed(0))


def dequantised_copy(model, fmt):
    """The model holding exactly the weights a `fmt` checkpoint carries, built without the checkpoint files."""
    copy = DeepseekV3(model.args).eval()
    copy.load_state_dict(model.state_dict())
    assert load_named(copy, quantize_named(hf_tensors(model), fmt)) > 0
    return copy


@pytest.mark.parametrize("fmt", ["fp8", "fp8+fp4-experts"])
def test_quantised_checkpoint_reads_the_same_in_transformers_and_ours(model, ids, fmt, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    save_pretrained(model, tmp_path, quantization=fmt)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_b_proj.weight")
        s = f.get_tensor("model.layers.0.self_attn.q_b_proj.weight_scale_inv")
        assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 1) and s.dtype == torch.float32
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32  # kept in high precision
        expert = f.get_tensor("model.layers.1.mlp.experts.0.gate_proj.weight")
        if fmt == "fp8+fp4-experts":
            scale = f.get_tensor("model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv")
            assert expert.dtype == torch.int8 and expert.shape == (128, 128) and scale.dtype == torch.float8_e8m0fnu
            assert scale.shape == (128, 8)
        else:
            assert expert.dtype == torch.float8_e4m3fn
    ours = from_pretrained(tmp_path)
    want = dequantised_copy(model, fmt)(ids).logits
    assert torch.equal(ours(ids).logits, want)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                              quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
    with torch.no_grad():
        assert (hf(ids).logits - want).abs().max() < 1e-4
    if fmt == "fp8+fp4-experts":
        with pytest.raises(CheckpointError, match="MXFP4 routed experts"):
            check_vllm_servable(tmp_path)


def test_quantise_on_sync_gives_the_checkpoints_logprobs(model, ids, tmp_path):
    from dspost.rollout.sync import make_buckets, unpack_bucket

    save_pretrained(model, tmp_path, quantization="fp8+fp4-experts")
    receiver = DeepseekV3(model.args).init_weights(99).eval()  # different weights until synced
    buckets = list(make_buckets(quantize_named(hf_tensors(model), "fp8+fp4-experts"), bucket_bytes=200_000))
    assert len(buckets) > 3  # weights and their scales cross bucket boundaries
    load_named(receiver, [pair for b in buckets for pair in unpack_bucket(b)])
    assert torch.equal(receiver(ids).logits, from_pretrained(tmp_path)(ids).logits)


def test_training_modes_swap_the_matmul_path_not_the_parameters(model, ids):
    labels = torch.roll(ids, -1, 1)
    losses = {}
    for mode in ("none", "fp8", "fp4-qat", "fp8+fp4-qat"):
        m = DeepseekV3(model.args)
        m.load_state_dict(model.state_dict())
        names = set(m.state_dict())
        apply_training_precision(m, mode)
        assert set(m.state_dict()) == names
        assert any(isinstance(x, Fp8Linear) for x in m.modules()) == ("fp8" in mode)
        out = m(ids, labels=labels)
        out.loss.backward()
        # Gradients reach the high-precision masters through the quantised products.
        assert m.model.layers[1].mlp.experts.gate_up_proj.grad.abs().sum() > 0
        assert m.model.layers[0].self_attn.q_b_proj.weight.grad.abs().sum() > 0
        losses[mode] = out.loss.item()
    for mode in ("fp8", "fp4-qat", "fp8+fp4-qat"):
        assert abs(losses[mode] / losses["none"] - 1) < 2e-3, losses  # same model, lower-precision products
    with pytest.raises(ValueError, match="expected one of"):
        apply_training_precision(model, "int4")


def test_fp8_backward_gemms_follow_the_exact_gradients():
    from dspost.model.quant import fp8_matmul

    g = torch.Generator().manual_seed(1)
    x = torch.randn(70, 256, generator=g, requires_grad=True)  # 70 tokens: padded to 128 for Wgrad
    w = torch.randn(384, 256, generator=g, requires_grad=True)
    grad_out = torch.randn(70, 384, generator=g)
    fp8_matmul(x, w).backward(grad_out)
    exact_x, exact_w = grad_out @ w.detach(), grad_out.T @ x.detach()
    for got, exact in ((x.grad, exact_x), (w.grad, exact_w)):
        assert (got - exact).norm() / exact.norm() < 0.08  # e4m3 keeps 3 mantissa bits
