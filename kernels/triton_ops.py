"""Triton kernels for the FP8 / MXFP4 formats, each behind a thin launcher that checks its inputs.

The launchers take CUDA tensors, or CPU tensors when Triton's interpreter is on (`TRITON_INTERPRET=1`, set
before Triton is imported), which is how the tests run them here. Semantics are those of `reference.py`."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dspost.kernels.reference import MX_BLOCK


def _check(*tensors: torch.Tensor) -> None:
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    for t in tensors:
        if not (t.is_cuda or interpreted):
            raise ValueError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for Triton's CPU interpreter); "
                             "the functions in dspost.kernels dispatch to the plain-torch reference on CPU")
        if not t.is_contiguous():
            raise ValueError(f"expected a contiguous tensor, got strides {t.stride()} for shape {tuple(t.shape)}")


# ------------------------------------------------------------------------------------------- FP8
@triton.jit
def _round_e4m3(v):
    """v (within +-448) rounded to the nearest e4m3 value, ties to even, in fp32. The cast that follows is
    then exact: the rounding is ours, the same on every backend (Triton's CPU interpreter mis-rounds casts
    whose mantissa carries into the exponent, e.g. 7.9 -> 4)."""
    a = tl.abs(v)
    step = tl.exp2(tl.floor(tl.log2(tl.maximum(a, 0.015625))) - 3.0)  # 3 mantissa bits; subnormals below 2^-6
    t = a / step
    r = tl.floor(t + 0.5)
    r = tl.where((r - t == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)
    return tl.where(v < 0, -r * step, r * step)


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, BLOCK: tl.constexpr, UE8M0: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x)), 1e-4) / 448.0
    if UE8M0:
        s = tl.exp2(tl.ceil(tl.log2(s)))
    y = _round_e4m3(tl.clamp(x / s, -448.0, 448.0))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty))
    tl.store(s_ptr + pid, s)


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None):
    _check(x)
    if x.shape[-1] % block_size:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of block_size {block_size}")
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"scale_fmt must be None (fp32 scales) or 'ue8m0', got {scale_fmt!r}")
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(*x.shape[:-1], x.shape[-1] // block_size, dtype=torch.float32, device=x.device)
    _act_quant_kernel[(x.numel() // block_size,)](x, y, s, BLOCK=block_size, UE8M0=scale_fmt == "ue8m0")
    return y, s


@triton.jit
def _weight_quant_kernel(w_ptr, q_ptr, s_ptr, N, K, BLOCK: tl.constexpr):
    pn, pk = tl.program_id(0), tl.program_id(1)
    rn = pn * BLOCK + tl.arange(0, BLOCK)
    rk = pk * BLOCK + tl.arange(0, BLOCK)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(w)), 1e-12) / 448.0
    q = _round_e4m3(tl.clamp(w / s, -448.0, 448.0))
    tl.store(q_ptr + rn[:, None] * K + rk[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + pn * tl.cdiv(K, BLOCK) + pk, s)


def weight_quant(w: torch.Tensor, block_size: int = 128):
    _check(w)
    if w.dim() != 2:
        raise ValueError(f"weight_quant takes a 2-D weight, got shape {tuple(w.shape)}")
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty(triton.cdiv(N, block_size), triton.cdiv(K, block_size), dtype=torch.float32, device=w.device)
    _weight_quant_kernel[s.shape](w, q, s, N, K, BLOCK=block_size)
    return q, s


@triton.jit
def _weight_dequant_kernel(q_ptr, s_ptr, y_ptr, N, K, BLOCK: tl.constexpr):
    pn, pk = tl.program_id(0), tl.program_id(1)
    rn = pn * BLOCK + tl.arange(0, BLOCK)
    rk = pk * BLOCK + tl.arange(0, BLOCK)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    q = tl.load(q_ptr + rn[:, None] * K + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + pn * tl.cdiv(K, BLOCK) + pk)
    tl.store(y_ptr + rn[:, None] * K + rk[None, :], (q * s).to(y_ptr.dtype.element_ty), mask=mask)


def weight_dequant(q: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128, dtype: torch.dtype = torch.float32):
    _check(q, scale_inv)
    N, K = q.shape
    expected = (triton.cdiv(N, block_size), triton.cdiv(K, block_size))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {N}x{K} "
                         f"in {block_size}x{block_size} blocks (expected {expected})")
    y = torch.empty(N, K, dtype=dtype, device=q.device)
    _weight_dequant_kernel[expected](q, scale_inv.float().contiguous(), y, N, K, BLOCK=block_size)
    return y


@triton.jit
def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pm, pn = tl.program_id(0), tl.program_id(1)
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    kb = tl.cdiv(K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, kb):
        kk = k * BLOCK_K + rk
        a = tl.load(a_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rn[None, :] * K + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        a_s = tl.load(as_ptr + rm * kb + k, mask=rm < M, other=0.0)
        b_s = tl.load(bs_ptr + (rn // BLOCK_K) * kb + k, mask=rn < N, other=0.0)
        # Promote each K-block's partial product to fp32 with its scales before adding (DeepSeek-V3's
        # fine-grained accumulation: FP8 tensor cores keep too few accumulator bits over long K).
        acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def fp8_gemm(a_q, a_scale, b_q, b_scale_inv, block_size: int = 128, out_dtype: torch.dtype | None = None,
             block_m: int = 64, block_n: int = 128):
    _check(a_q, a_scale, b_q, b_scale_inv)
    M, K = a_q.shape
    N = b_q.shape[0]
    if a_q.dtype != torch.float8_e4m3fn or b_q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_gemm takes float8_e4m3fn operands, got {a_q.dtype} and {b_q.dtype}")
    if b_q.shape[1] != K or tuple(a_scale.shape) != (M, triton.cdiv(K, block_size)) \
            or tuple(b_scale_inv.shape) != (triton.cdiv(N, block_size), triton.cdiv(K, block_size)):
        raise ValueError(f"fp8_gemm shapes do not fit: A {tuple(a_q.shape)} with scales {tuple(a_scale.shape)}, "
                         f"B {tuple(b_q.shape)} with scales {tuple(b_scale_inv.shape)} ({block_size}-blocks)")
    if block_size % block_n:
        raise ValueError(f"block_n {block_n} must divide the weight block {block_size}")
    c = torch.empty(M, N, dtype=out_dtype or torch.get_default_dtype(), device=a_q.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _fp8_gemm_kernel[grid](a_q, a_scale.float().contiguous(), b_q, b_scale_inv.float().contiguous(), c, M, N, K,
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_size)
    return c


# ------------------------------------------------------------------------------------------ MXFP4
@triton.jit
def _e2m1_value(code):
    """E2M1 code (4 bits, sign in bit 3) -> float: e=0 subnormal m/2, else 2^(e-1) (1 + m/2)."""
    e = (code >> 1) & 3
    m = (code & 1).to(tl.float32)
    mag = tl.where(e == 0, m * 0.5, tl.exp2((e - 1).to(tl.float32)) * (1.0 + m * 0.5))
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _mxfp4_dequant_kernel(p_ptr, s_ptr, y_ptr, HALF: tl.constexpr):
    # One program per 1x32 block: 16 packed bytes and one scale byte.
    pid = tl.program_id(0)
    offs = pid * HALF + tl.arange(0, HALF)
    byte = tl.load(p_ptr + offs).to(tl.int32)
    scale = tl.exp2(tl.load(s_ptr + pid).to(tl.float32) - 127.0)
    lo = _e2m1_value(byte & 15) * scale
    hi = _e2m1_value(byte >> 4) * scale
    tl.store(y_ptr + 2 * offs, lo.to(y_ptr.dtype.element_ty))
    tl.store(y_ptr + 2 * offs + 1, hi.to(y_ptr.dtype.element_ty))


def mxfp4_dequant(packed: torch.Tensor, scales: torch.Tensor, block_size: int = MX_BLOCK, dtype=torch.float32):
    _check(packed, scales)
    if packed.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 takes uint8 packed values and e8m0 scale bytes, got {packed.dtype}, {scales.dtype}")
    if scales.shape[-1] * block_size != packed.shape[-1] * 2 or scales.shape[:-1] != packed.shape[:-1]:
        raise ValueError(f"MXFP4 scales {tuple(scales.shape)} do not match packed values {tuple(packed.shape)}")
    y = torch.empty(*packed.shape[:-1], packed.shape[-1] * 2, dtype=dtype, device=packed.device)
    _mxfp4_dequant_kernel[(scales.numel(),)](packed, scales, y, HALF=block_size // 2)
    return y


@triton.jit
def _e2m1_code(v):
    """Nearest E2M1 code of v (already scaled into [-6, 6]), ties to the even code."""
    a = tl.abs(v)
    c = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32) + (a >= 1.75).to(tl.int32) \
        + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32)
    return c | tl.where(v < 0, 8, 0)


@triton.jit
def _mxfp4_quant_kernel(w_ptr, p_ptr, s_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    half = tl.arange(0, BLOCK // 2)
    even = tl.load(w_ptr + pid * BLOCK + 2 * half).to(tl.float32)
    odd = tl.load(w_ptr + pid * BLOCK + 2 * half + 1).to(tl.float32)
    amax = tl.maximum(tl.maximum(tl.max(tl.abs(even)), tl.max(tl.abs(odd))), 6.0 * 1.1754943508222875e-38)
    exp = tl.clamp(tl.ceil(tl.log2(amax / 6.0)), -127.0, 127.0)
    inv = tl.exp2(-exp)
    lo = _e2m1_code(tl.clamp(even * inv, -6.0, 6.0))
    hi = _e2m1_code(tl.clamp(odd * inv, -6.0, 6.0))
    tl.store(p_ptr + pid * (BLOCK // 2) + half, (lo | (hi << 4)).to(tl.uint8))
    tl.store(s_ptr + pid, (exp + 127.0).to(tl.uint8))


def mxfp4_quant(w: torch.Tensor, block_size: int = MX_BLOCK):
    _check(w)
    if w.shape[-1] % block_size:
        raise ValueError(f"last dim {w.shape[-1]} is not a multiple of the MXFP4 block {block_size}")
    packed = torch.empty(*w.shape[:-1], w.shape[-1] // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(*w.shape[:-1], w.shape[-1] // block_size, dtype=torch.uint8, device=w.device)
    _mxfp4_quant_kernel[(scales.numel(),)](w, packed, scales, BLOCK=block_size)
    return packed, scales


@triton.jit
def _mxfp4_gemm_kernel(a_ptr, as_ptr, p_ptr, s_ptr, c_ptr, M, N, K, HAS_A_SCALE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MX: tl.constexpr):
    # W is dequantised tile by tile in registers: FP4 never becomes a full-precision copy in memory.
    pm, pn = tl.program_id(0), tl.program_id(1)
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * K + kk[None, :], mask=rm[:, None] < M, other=0.0).to(tl.float32)
        if HAS_A_SCALE:
            a = a * tl.load(as_ptr + rm[:, None] * (K // 128) + kk[None, :] // 128, mask=rm[:, None] < M, other=0.0)
        byte = tl.load(p_ptr + rn[None, :] * (K // 2) + kk[:, None] // 2, mask=rn[None, :] < N, other=0).to(tl.int32)
        code = tl.where(kk[:, None] % 2 == 0, byte & 15, byte >> 4)
        scale = tl.load(s_ptr + rn[None, :] * (K // MX) + kk[:, None] // MX, mask=rn[None, :] < N, other=127)
        w = _e2m1_value(code) * tl.exp2(scale.to(tl.float32) - 127.0)
        acc += tl.dot(a, w, out_dtype=tl.float32)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def mxfp4_gemm(a, packed, scales, a_scale=None, out_dtype=None, block_m: int = 16, block_n: int = 64,
               block_k: int = 64):
    _check(a, packed, scales, *([a_scale] if a_scale is not None else []))
    M, K = a.shape
    N = packed.shape[0]
    if packed.shape[1] * 2 != K or tuple(scales.shape) != (N, K // MX_BLOCK) or K % block_k:
        raise ValueError(f"mxfp4_gemm shapes do not fit: A {tuple(a.shape)}, packed W {tuple(packed.shape)}, "
                         f"scales {tuple(scales.shape)} (K must be a multiple of {block_k})")
    if a_scale is not None and (a.dtype != torch.float8_e4m3fn or tuple(a_scale.shape) != (M, K // 128)):
        raise ValueError(f"an activation scale goes with FP8 activations and one scale per 1x128 tile, got "
                         f"{a.dtype} and scales {tuple(a_scale.shape)}")
    c = torch.empty(M, N, dtype=out_dtype or torch.get_default_dtype(), device=a.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _mxfp4_gemm_kernel[grid](a, a_scale.float().contiguous() if a_scale is not None else a, packed, scales, c, M, N, K,
                             HAS_A_SCALE=a_scale is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                             MX=MX_BLOCK)
    return c


# ----------------------------------------------------------------------------------- grouped GEMM
@triton.jit
def _grouped_gemm_kernel(x_ptr, w_ptr, y_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, N, K,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One launch for every expert: program (t, n) computes row tile t (which lies inside one expert's group)
    # times that expert's weight columns n.
    t, pn = tl.program_id(0), tl.program_id(1)
    e = tl.load(tile_expert_ptr + t).to(tl.int64)
    start = tl.load(tile_start_ptr + t)
    end = tl.load(tile_end_ptr + t)
    rm = start + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < end) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + e * N * K + rn[None, :] * K + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K),
                    other=0.0)
        acc += tl.dot(x, w, out_dtype=tl.float32)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < end) & (rn[None, :] < N))


def grouped_gemm(x_sorted: torch.Tensor, weights: torch.Tensor, group_sizes, block_m: int = 32, block_n: int = 64,
                 block_k: int = 32):
    _check(x_sorted, weights)
    sizes = [int(s) for s in group_sizes]
    T, K = x_sorted.shape
    E, N, Kw = weights.shape
    if Kw != K or len(sizes) != E or sum(sizes) != T:
        raise ValueError(f"grouped_gemm: x {tuple(x_sorted.shape)}, weights {tuple(weights.shape)}, group sizes sum "
                         f"to {sum(sizes)} over {len(sizes)} groups")
    # Row tiles never straddle two experts: each group is cut into its own tiles.
    experts, starts, ends = [], [], []
    start = 0
    for e, n in enumerate(sizes):
        for s in range(start, start + n, block_m):
            experts.append(e)
            starts.append(s)
            ends.append(start + n)
        start += n
    y = torch.empty(T, N, dtype=x_sorted.dtype, device=x_sorted.device)
    if not experts:
        return y
    meta = torch.tensor([experts, starts, ends], dtype=torch.int32, device=x_sorted.device)
    grid = (len(experts), triton.cdiv(N, block_n))
    _grouped_gemm_kernel[grid](x_sorted, weights, y, meta[0], meta[1], meta[2], N, K,
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y


# ---------------------------------------------------------------------------------- FP8 attention
@triton.jit
def _fp8_block(x):
    """(x quantised to e4m3 with one scale, the scale, whether the block was finite)."""
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = tl.maximum(amax, 1e-12) / 448.0
    ok = amax < float("inf")  # False for inf and NaN
    q = _round_e4m3(tl.clamp(x / scale, -448.0, 448.0)).to(tl.float8e4nv)
    return q, scale, ok


@triton.jit
def _bf16(x):
    """x rounded to bf16 (nearest, ties to even) but kept in fp32: an fp32 product of such values is the bf16
    product with fp32 accumulation. Rounded with integer ops, the same on every backend (Triton's CPU
    interpreter truncates in its bf16 cast)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _fp8_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, fallback_ptr, S, sm_scale, CAUSAL: tl.constexpr,
                          D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pm, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rd, rdv = tl.arange(0, D), tl.arange(0, DV)
    q = tl.load(q_ptr + bh * S * D + rm[:, None] * D + rd[None, :], mask=rm[:, None] < S, other=0.0).to(tl.float32)
    q8, q_s, q_ok = _fp8_block(q)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, DV), tl.float32)
    hi = tl.minimum((pm + 1) * BLOCK_M, S) if CAUSAL else S
    for start in range(0, hi, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + bh * S * D + rn[:, None] * D + rd[None, :], mask=rn[:, None] < S, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + bh * S * DV + rn[:, None] * DV + rdv[None, :], mask=rn[:, None] < S, other=0.0).to(tl.float32)
        k8, k_s, k_ok = _fp8_block(k)
        s = tl.dot(q8, tl.trans(k8), out_dtype=tl.float32) * (q_s * k_s)
        bad = tl.sum(tl.sum((tl.abs(s) >= float("inf")) | (s != s), axis=1).to(tl.int32), axis=0)
        if (bad > 0) | (not q_ok) | (not k_ok):
            s = tl.dot(_bf16(q), tl.trans(_bf16(k)), out_dtype=tl.float32)
            tl.atomic_add(fallback_ptr, 1)
        s = s * sm_scale
        keep = rn[None, :] < S
        if CAUSAL:
            keep = keep & (rn[None, :] <= rm[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.where(m_i == float("-inf"), 0.0, tl.exp(m_i - m_new))
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v8, v_s, _ = _fp8_block(v)
        p8 = _round_e4m3(p * 448.0).to(tl.float8e4nv)
        acc = acc * alpha[:, None] + tl.dot(p8, v8, out_dtype=tl.float32) * (v_s / 448.0)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + bh * S * DV + rm[:, None] * DV + rdv[None, :], out.to(o_ptr.dtype.element_ty), mask=rm[:, None] < S)


def fp8_attention(q, k, v, causal: bool = True, block_m: int = 64, block_n: int = 64, sm_scale: float | None = None):
    """See `reference.fp8_attention`; returns (out, fallbacks)."""
    _check(q, k, v)
    B, H, S, D = q.shape
    DV = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"fp8_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit")
    if D & (D - 1) or DV & (DV - 1) or D < 16 or DV < 16:
        raise ValueError(f"fp8_attention: head dims must be powers of two >= 16, got {D} and {DV}")
    o = torch.empty(B, H, S, DV, dtype=q.dtype, device=q.device)
    counter = torch.zeros(1, dtype=torch.int32, device=q.device)
    grid = (triton.cdiv(S, block_m), B * H)
    _fp8_attention_kernel[grid](q, k, v, o, counter, S, sm_scale if sm_scale is not None else D ** -0.5,
                                CAUSAL=causal, D=D, DV=DV, BLOCK_M=block_m, BLOCK_N=block_n)
    return o, int(counter.item())
