"""FP8 / MXFP4 / grouped-GEMM kernels: the references keep the formats' error bounds, and each Triton kernel
matches its reference on fresh random inputs with outliers and all-zero blocks (Triton's interpreter on the
CPU; natively on a GPU)."""

import pytest
import torch

from dspost import kernels
from dspost.kernels import reference as ref


def spiky(shape, seed, device="cpu"):
    """Normal values with outliers and one all-zero 128-block / 32-block at the start."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    idx = torch.randint(0, flat.numel(), (max(flat.numel() // 200, 1),), generator=g)
    flat[idx] *= 100.0
    x[..., :128] = 0.0
    return x.to(device)


def assert_fp8_equal(got, want, seed):
    # The kernels round to the e4m3 grid themselves (ties to even), exactly as torch's cast does.
    assert torch.equal(got.float().cpu(), want.float().cpu()), f"seed {seed}"


# ------------------------------------------------------------------------------ reference bounds
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_act_quant_error_bound(seed, scale_fmt):
    x = spiky((8, 512), seed)
    q, s = ref.act_quant(x, scale_fmt=scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (8, 4)
    deq = (q.float().unflatten(-1, (-1, 128)) * s[..., None]).flatten(-2)
    amax = x.abs().unflatten(-1, (-1, 128)).amax(-1).repeat_interleave(128, -1)
    assert ((deq - x).abs() <= amax / 16 + 1e-6).all(), f"seed {seed}"  # half a step at the top of the range
    assert (deq[:, :128] == 0).all()
    if scale_fmt == "ue8m0":
        assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # powers of two


def test_weight_quant_round_trip_and_ragged_edges(seed):
    w = spiky((300, 200), seed)
    q, s = kernels.weight_quant(w)
    assert s.shape == (3, 2)
    deq = kernels.weight_dequant(q, s)
    amax = torch.stack([torch.stack([w[i:i + 128, j:j + 128].abs().max() for j in (0, 128)]) for i in (0, 128, 256)])
    bound = amax.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200] / 16
    assert ((deq - w).abs() <= bound + 1e-6).all(), f"seed {seed}"
    with pytest.raises(ValueError, match="does not match weight"):
        kernels.weight_dequant(q, s[:2])


def test_fp8_gemm_is_the_product_of_dequantised_operands(seed):
    a, b = spiky((33, 384), seed), spiky((256, 384), seed + 1)
    (aq, as_), (bq, bs) = ref.act_quant(a), ref.weight_quant(b)
    want = (aq.float().unflatten(-1, (-1, 128)) * as_[..., None]).flatten(-2) @ ref.weight_dequant(bq, bs).T
    got = kernels.fp8_gemm(aq, as_, bq, bs)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-3 * want.abs().max()), f"seed {seed}"
    exact = a @ b.T  # and close to the full-precision product
    assert (got - exact).norm() / exact.norm() < 0.05


def test_mxfp4_format(seed):
    w = spiky((16, 256), seed)
    packed, scales = kernels.mxfp4_quant(w)
    assert packed.shape == (16, 128) and scales.shape == (16, 8) and packed.dtype == scales.dtype == torch.uint8
    deq = kernels.mxfp4_dequant(packed, scales)
    s = torch.exp2(scales.float() - 127).repeat_interleave(32, -1)
    assert ((deq - w).abs() <= s + 1e-12).all(), f"seed {seed}"  # at most half of the widest gap (2) per scale unit
    assert (deq[:, :128] == 0).all()
    grid = torch.tensor(kernels.E2M1_VALUES)
    exact = torch.stack([grid.repeat(4), -grid.repeat(4) * 4, grid.repeat(4) / 8, torch.cat([grid, -grid] * 2)])
    assert torch.equal(kernels.mxfp4_dequant(*kernels.mxfp4_quant(exact)), exact)  # the grid times 2^k is exact
    ties = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4])  # amax 6: scale 1
    assert kernels.mxfp4_dequant(*kernels.mxfp4_quant(ties))[0, :8].tolist() == [0, 1, 1, 2, 2, 4, 4, 6]
    x = torch.randn(4, 256)
    assert torch.allclose(kernels.mxfp4_gemm(x, packed, scales), x @ deq.T, atol=1e-4)


def test_grouped_gemm_matches_a_loop_over_experts(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [5, 0, 17, 1, 0, 9]
    x, w = torch.randn(32, 48, generator=g), torch.randn(6, 24, 48, generator=g)
    want = torch.cat([x[s - n: s] @ w[e].T for e, (n, s) in enumerate(zip(sizes, torch.tensor(sizes).cumsum(0).tolist()))])
    assert torch.allclose(kernels.grouped_gemm(x, w, sizes), want, atol=1e-5)
    with pytest.raises(ValueError, match="sum to 31"):
        kernels.grouped_gemm(x, w, [5, 0, 16, 1, 0, 9])


# ------------------------------------------------------------------------ Triton vs reference
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_triton_act_quant(triton_ops, device, seed, scale_fmt):
    x = spiky((6, 384), seed, device)
    q, s = triton_ops.act_quant(x, scale_fmt=scale_fmt)
    q_ref, s_ref = ref.act_quant(x.cpu(), scale_fmt=scale_fmt)
    assert torch.allclose(s.cpu(), s_ref, rtol=1e-6)
    assert_fp8_equal(q, q_ref, seed)


def test_triton_weight_quant_and_dequant(triton_ops, device, seed):
    w = spiky((200, 300), seed, device)
    q, s = triton_ops.weight_quant(w)
    q_ref, s_ref = ref.weight_quant(w.cpu())
    assert torch.allclose(s.cpu(), s_ref, rtol=1e-6)
    assert_fp8_equal(q, q_ref, seed)
    assert torch.equal(triton_ops.weight_dequant(q_ref.to(device), s_ref.to(device)).cpu(), ref.weight_dequant(q_ref, s_ref))


def test_triton_fp8_gemm(triton_ops, device, seed):
    a, b = spiky((70, 384), seed), spiky((192, 384), seed + 1)
    (aq, as_), (bq, bs) = ref.act_quant(a), ref.weight_quant(b)
    got = triton_ops.fp8_gemm(*(t.to(device) for t in (aq, as_, bq, bs)), out_dtype=torch.float32).cpu()
    want = ref.fp8_gemm(aq, as_, bq, bs, out_dtype=torch.float32)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max()), f"seed {seed}"


def test_triton_mxfp4(triton_ops, device, seed):
    w = spiky((48, 256), seed, device)
    packed, scales = triton_ops.mxfp4_quant(w)
    p_ref, s_ref = ref.mxfp4_quant(w.cpu())
    assert torch.equal(scales.cpu(), s_ref)
    # A value on a rounding midpoint may land on either neighbour after the interpreter's float division.
    assert (packed.cpu() != p_ref).float().mean() < 1e-3, f"seed {seed}"
    assert torch.equal(triton_ops.mxfp4_dequant(p_ref.to(device), s_ref.to(device)).cpu(), ref.mxfp4_dequant(p_ref, s_ref))
    a = torch.randn(5, 256)
    got = triton_ops.mxfp4_gemm(a.to(device), p_ref.to(device), s_ref.to(device), out_dtype=torch.float32).cpu()
    want = ref.mxfp4_gemm(a, p_ref, s_ref, out_dtype=torch.float32)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), f"seed {seed}"
    aq, as_ = ref.act_quant(a)
    got = triton_ops.mxfp4_gemm(aq.to(device), p_ref.to(device), s_ref.to(device), as_.to(device), out_dtype=torch.float32)
    assert torch.allclose(got.cpu(), ref.mxfp4_gemm(aq, p_ref, s_ref, as_, out_dtype=torch.float32), rtol=1e-5, atol=1e-4)


def test_triton_grouped_gemm(triton_ops, device, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [40, 0, 3, 65, 0, 20]
    x, w = torch.randn(128, 64, generator=g), torch.randn(6, 96, 64, generator=g)
    got = triton_ops.grouped_gemm(x.to(device), w.to(device), sizes).cpu()
    assert torch.allclose(got, ref.grouped_gemm(x, w, sizes), atol=1e-4), f"seed {seed}"


def test_triton_launchers_check_their_inputs(triton_ops, device):
    x = torch.randn(4, 256, device=device)
    with pytest.raises(ValueError, match="contiguous"):
        triton_ops.act_quant(x.T.contiguous().T)
    with pytest.raises(ValueError, match="multiple of block_size"):
        triton_ops.act_quant(torch.randn(4, 100, device=device))
    with pytest.raises(ValueError, match="float8_e4m3fn operands"):
        triton_ops.fp8_gemm(x, torch.ones(4, 2, device=device), x, torch.ones(1, 2, device=device))
    with pytest.raises(ValueError, match="uint8"):
        triton_ops.mxfp4_dequant(x, x)


def test_cpu_tensors_dispatch_to_the_reference():
    x = torch.randn(2, 256)
    q, s = kernels.act_quant(x)
    q_ref, s_ref = ref.act_quant(x)
    assert torch.equal(q.float(), q_ref.float()) and torch.equal(s, s_ref)


def qkv(seed, shape=(1, 2, 100, 32)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


@pytest.mark.parametrize("causal", [True, False])
def test_fp8_attention_reference_is_attention(seed, causal):
    q, k, v = qkv(seed)
    out, fallbacks = kernels.fp8_attention(q, k, v, causal=causal)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert fallbacks == 0
    assert (out - exact).abs().mean() < 0.02 and (out - exact).abs().max() < 0.3, f"seed {seed}"  # FP8 error


def test_fp8_attention_falls_back_per_block(seed):
    q, k, v = qkv(seed)
    k[0, 0, 40, 3] = float("inf")  # one bad key in head 0's second 32-key block
    out, fallbacks = ref.fp8_attention(q, k, v, block_m=32, block_n=32)
    assert fallbacks == 3  # query blocks 2, 3 and 4 meet that key block
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out.isnan(), exact.isnan())  # NaN exactly where exact attention has it
    rows = slice(32, 40)  # same block as the bad key, before it: rescued by the bf16 recompute
    assert torch.isfinite(out[0, 0, rows]).all() and (out[0, 0, rows] - exact[0, 0, rows]).abs().max() < 0.3
    assert torch.isfinite(out[0, 1]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the planted inf
@pytest.mark.parametrize("causal", [True, False])
def test_triton_fp8_attention(triton_ops, device, seed, causal):
    q, k, v = qkv(seed)
    if causal:
        k[0, 0, 40, 3] = float("inf")
    got, n = triton_ops.fp8_attention(*(t.to(device) for t in (q, k, v)), causal=causal, block_m=32, block_n=32)
    want, n_ref = ref.fp8_attention(q, k, v, causal=causal, block_m=32, block_n=32)
    assert n == n_ref
    torch.testing.assert_close(got.cpu(), want, equal_nan=True, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")


def test_model_experts_through_the_grouped_gemm_kernel(triton_ops, device):
    """The model's expert path on the Triton grouped GEMM: same loss and gradients as its own path."""
    from dspost.model import DeepseekV3
    from dspost.model.quant import use_grouped_gemm
    from tests.model.conftest import small_args

    args = small_args(num_nextn_predict_layers=0)
    ids = torch.randint(6, 90, (2, 12), generator=torch.Generator().manual_seed(0), device=device)
    results = []
    for kernel in (False, True):
        m = DeepseekV3(args).init_weights(0).to(device)
        if kernel:
            use_grouped_gemm(m, triton_ops.grouped_gemm)
        loss = m(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), m.model.layers[1].mlp.experts.gate_up_proj.grad.clone(),
                        m.model.embed_tokens.weight.grad.clone()))
    (l0, ge0, gx0), (l1, ge1, gx1) = results
    assert torch.allclose(l0, l1, atol=1e-5)
    assert torch.allclose(ge0, ge1, atol=1e-5) and torch.allclose(gx0, gx1, atol=1e-5)
