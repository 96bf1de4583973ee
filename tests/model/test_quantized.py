"""FP8 / MXFP4 weights: DeepSeek-format checkpoints that transformers reads as we do, quantise-on-sync, and the
FP8 / FP4-QAT training modes, whose products are compared GEMM by GEMM with the exact ones at the formats'
error bounds (so a product run in full precision, negated, or with the weights left unrounded fails)."""

import json
import math

import pytest
import torch

from dspost.model import CheckpointError, DeepseekV3, check_vllm_servable, from_pretrained, hf_tensors, tiny_math
from dspost.model.checkpoint import load_named, quantize_named, save_pretrained
from dspost.model.deepseek_v3 import RoutedExperts
from dspost.model.quant import Fp8Linear, apply_training_precision, fp8_matmul


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


# ---------------------------------------------------------------------------------------- the formats
# e4m3 keeps 3 mantissa bits: round to nearest moves a normal value by at most U = 2^-4 of itself, a subnormal
# (below 2^-6 of the scaled range) by at most half its step 2^-9. DeepSeek-V3 scales activations per 1x128 tile and
# weights per 128x128 block so that the block's largest magnitude maps to 448.
U, SUB = 2.0 ** -4, 2.0 ** -10
# Relative RMS rounding error of one operand, for mantissas spread log-uniformly over [1, 2): a uniform error of
# one step 2^-3 (RMS 2^-3 / sqrt 12) times sqrt(E[1/m^2]) = sqrt(3 / (8 ln 2)): 0.0266. A product of two rounded
# operands errs by sqrt 2 of that (0.0376), the weight gradient (activations rounded twice: per tile, then per
# block of the transpose) by sqrt 3.
SIGMA = 2.0 ** -3 / math.sqrt(12) * math.sqrt(3 / (8 * math.log(2)))


def rel(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got - exact).norm() / exact.norm())


def e4m3_tiles(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] rounded through e4m3 with one scale per 1x128 tile (K a multiple of 128), dequantised."""
    t = x.float().unflatten(-1, (-1, 128))
    s = t.abs().amax(-1, keepdim=True) / 448
    return ((t / s).to(torch.float8_e4m3fn).float() * s).flatten(-2)


def e4m3_blocks(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] rounded through e4m3 with one scale per 128x128 block (edge blocks over their real elements)."""
    out = torch.empty_like(w, dtype=torch.float32)
    for i in range(0, w.shape[0], 128):
        for j in range(0, w.shape[1], 128):
            b = w[i:i + 128, j:j + 128].float()
            s = b.abs().max() / 448
            out[i:i + 128, j:j + 128] = (b / s).to(torch.float8_e4m3fn).float() * s
    return out


def e4m3_bound(a: torch.Tensor, b: torch.Tensor, a_roundings: int = 1) -> torch.Tensor:
    """Worst-case |error| of a @ b^T when each element of b is rounded once and each of a `a_roundings` times:
    by at most (1 + U)^n - 1 of itself, plus n subnormal half-steps of a scale at most the operand's max / 448."""
    def err(x, n):
        return ((1 + U) ** n - 1) * x.abs() + 2 * n * SUB * x.abs().max() / 448
    ea, eb = err(a, a_roundings), err(b, 1)
    return ea @ b.abs().T + a.abs() @ eb.T + ea @ eb.T + 1e-5 * (a.abs() @ b.abs().T)  # + fp32 accumulation


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def mxfp4_rounded(w: torch.Tensor) -> torch.Tensor:
    """w [..., K] rounded through MXFP4 (OCP MX: per 32 values a power-of-two scale 2^ceil(log2(amax / 6)),
    values to the nearest E2M1 magnitude), written as a nearest-neighbour search over the 8 magnitudes."""
    b = w.float().unflatten(-1, (-1, 32))
    scale = torch.exp2(torch.ceil(torch.log2(b.abs().amax(-1, keepdim=True) / 6)))
    nearest = ((b.abs() / scale)[..., None] - E2M1).abs().argmin(-1)
    return (E2M1[nearest] * b.sign() * scale).flatten(-2)


# ------------------------------------------------------------------------------------------ one GEMM
def test_fp8_forward_is_the_product_of_e4m3_operands_at_the_format_error():
    """Fprop: x per 1x128 tile, w per 128x128 block (an edge block of 64 rows), fp32 accumulation."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(70, 256, generator=g), torch.randn(320, 256, generator=g)
    y, exact = fp8_matmul(x, w), x @ w.T
    torch.testing.assert_close(y, e4m3_tiles(x) @ e4m3_blocks(w).T, rtol=1e-5, atol=1e-4)
    assert ((y - exact).abs() <= e4m3_bound(x, w)).all()
    assert 0.75 < rel(y, exact) / (math.sqrt(2) * SIGMA) < 1.25  # of the expected size, and the right sign


def test_fp8_backward_gemms_are_within_the_format_error_of_the_exact_gradients():
    """Dgrad dx = g w and Wgrad dw = g^T x, both through e4m3: within the worst-case bound element by element,
    and with the relative error e4m3 rounding gives (not zero: the backward is not run in full precision)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(70, 256, generator=g, requires_grad=True)  # 70 tokens: padded to 128 for Wgrad
    w = torch.randn(384, 256, generator=g, requires_grad=True)
    grad_out = torch.randn(70, 384, generator=g)
    fp8_matmul(x, w).backward(grad_out)
    exact_x, exact_w = grad_out @ w.detach(), grad_out.T @ x.detach()
    assert ((x.grad - exact_x).abs() <= e4m3_bound(grad_out, w.detach().T)).all()
    assert ((w.grad - exact_w).abs() <= e4m3_bound(x.detach().T, grad_out.T, a_roundings=2).T).all()
    assert 0.75 < rel(x.grad, exact_x) / (math.sqrt(2) * SIGMA) < 1.25
    assert 0.75 < rel(w.grad, exact_w) / (math.sqrt(3) * SIGMA) < 1.25


# ------------------------------------------------------------------------------------- a small model
def record_products(model):
    """Capture every FP8 linear's input, output and gradients, and every routed-expert grouped product's
    operands and output gradient, during one forward and backward."""
    seen = []
    for name, m in model.named_modules():
        if isinstance(m, Fp8Linear):
            def fwd(mod, inp, out, name=name):
                seen.append({"name": name, "x": inp[0].detach().flatten(0, -2), "w": mod.weight,
                             "y": out.detach().flatten(0, -2)})
            def bwd(mod, grad_in, grad_out, name=name):
                rec = next(r for r in seen if r["name"] == name)
                rec["gx"], rec["gy"] = grad_in[0].flatten(0, -2), grad_out[0].flatten(0, -2)
            m.register_forward_hook(fwd)
            m.register_full_backward_hook(bwd)
        if isinstance(m, RoutedExperts):
            def grouped(x, w, counts, base=m.grouped_mm, name=name):
                y = base(x, w, counts)
                rec = {"name": f"{name}[{w.shape[1]}x{w.shape[2]}]", "x": x.detach(), "w": w, "counts": counts,
                       "y": y.detach()}
                if y.requires_grad:
                    y.register_hook(lambda g: rec.update(gy=g))
                seen.append(rec)
                return y
            m.grouped_mm = grouped
    return seen


def quantised_model(model, mode, ids, backward: bool = True):
    """A copy of `model` in `mode`, after one forward (and backward) with every product recorded."""
    m = DeepseekV3(model.args).train()
    m.load_state_dict(model.state_dict())
    names = set(m.state_dict())
    apply_training_precision(m, mode)
    assert set(m.state_dict()) == names  # same parameters: only the product path changes
    seen = record_products(m)
    with torch.set_grad_enabled(backward):
        out = m(ids, labels=torch.roll(ids, -1, 1))
    if backward:
        out.loss.backward()
    return m, out, seen


def per_expert(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The exact grouped product: rows of x sorted by expert, counts[e] rows times w[e]^T."""
    rows = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
    return torch.stack([x[i] @ w[e].T for i, e in enumerate(rows.tolist())])


@pytest.mark.parametrize("mode", ["fp8", "fp8+fp4-qat"])
def test_fp8_mode_runs_every_projection_through_e4m3(model, ids, mode):
    """In the model, each MLA / SwiGLU projection is FP8 in the forward, Dgrad and Wgrad, and each routed-expert
    product in the forward: every product within the worst-case e4m3 bound of the exact one on the same inputs,
    and off it by the RMS error e4m3 rounding gives (sqrt 2 sigma; sigma for a Dgrad whose output width is not
    a multiple of 128, where only the weight is rounded). Wgrad sums over 48 tokens whose few largest terms
    (block maxima, exact in e4m3) dominate some layers: only its bound and a floor of a quarter are checked."""
    m, _, seen = quantised_model(model, mode, ids)
    linears = [r for r in seen if "counts" not in r]
    assert len(linears) == sum(isinstance(x, Fp8Linear) for x in m.modules()) == 16
    for r in linears:
        x, w, y, gy, name = r["x"], r["w"].detach(), r["y"], r["gy"], r["name"]
        assert ((y - x @ w.T).abs() <= e4m3_bound(x, w)).all(), name
        assert 0.75 < rel(y, x @ w.T) / (math.sqrt(2) * SIGMA) < 1.25, name
        assert ((r["gx"] - gy @ w).abs() <= e4m3_bound(gy, w.T)).all(), name
        factor = math.sqrt(2) if w.shape[0] % 128 == 0 else 1.0
        assert 0.75 < rel(r["gx"], gy @ w) / (factor * SIGMA) < 1.25, name
        assert ((r["w"].grad - gy.T @ x).abs() <= e4m3_bound(x.T, gy.T, a_roundings=2).T).all(), name
        assert 0.25 < rel(r["w"].grad, gy.T @ x) / (math.sqrt(3) * SIGMA) < 1.25, name
    experts = [r for r in seen if "counts" in r]
    assert len(experts) == 2
    for r in experts:  # against the exact product with the weights the forward used (MXFP4-rounded with QAT)
        w = mxfp4_rounded(r["w"].detach()) if "fp4" in mode else r["w"].detach()
        assert 0.75 < rel(r["y"], per_expert(r["x"], w, r["counts"])) / (math.sqrt(2) * SIGMA) < 1.25, r["name"]


@pytest.mark.parametrize("mode", ["fp4-qat", "fp8+fp4-qat"])
def test_fp4_qat_forward_uses_mxfp4_weights_and_passes_the_gradient_straight_through(model, ids, mode):
    """The routed experts compute with their weights rounded through MXFP4 (an error of ~12% of the product
    here, not 0) and the master weights receive the gradient of those rounded weights unchanged (through
    FP8 Wgrad GEMMs in fp8+fp4-qat)."""
    m, _, seen = quantised_model(model, mode, ids)
    experts = [r for r in seen if "counts" in r]
    assert len(experts) == 2 and any(isinstance(x, Fp8Linear) for x in m.modules()) == ("fp8" in mode)
    for r in experts:
        x, w, counts = r["x"], r["w"].detach(), r["counts"]
        rounded = per_expert(x, mxfp4_rounded(w), counts)
        assert 0.05 < rel(rounded, per_expert(x, w, counts)) < 0.3  # the rounding is real at this size
        if mode == "fp4-qat":  # full-precision products of the rounded weights
            torch.testing.assert_close(r["y"], rounded, rtol=1e-5, atol=1e-6)
        else:
            assert 0.75 < rel(r["y"], rounded) / (math.sqrt(2) * SIGMA) < 1.25
    layer = m.model.layers[1].mlp.experts
    for param, r in zip((layer.gate_up_proj, layer.down_proj), experts):
        want = torch.zeros_like(param)
        start = 0
        for e, n in enumerate(r["counts"]):  # dL/dW_e = g_e^T x_e, straight through the rounding
            want[e] = r["gy"][start:start + n].T @ r["x"][start:start + n]
            start += n
        if mode == "fp4-qat":
            torch.testing.assert_close(param.grad, want, rtol=1e-4, atol=1e-7)
        else:
            assert 0.25 < rel(param.grad, want) / (math.sqrt(3) * SIGMA) < 1.25


def test_training_modes_keep_the_logits_within_the_products_error(model, ids):
    """The whole small model in each mode: logits off the full-precision ones by a few times one product's
    error (16 FP8 linears and 2 expert products in sequence; MXFP4 only on the routed experts), never 0 and
    never of order 1."""
    _, exact, _ = quantised_model(model, "none", ids, backward=False)
    want = {"fp8": (0.04, 0.25), "fp4-qat": (0.005, 0.08), "fp8+fp4-qat": (0.04, 0.25)}
    for mode, (lo, hi) in want.items():
        _, out, _ = quantised_model(model, mode, ids, backward=False)
        assert lo < rel(out.logits, exact.logits) < hi, mode
    with pytest.raises(ValueError, match="expected one of"):
        apply_training_precision(model, "int4")
