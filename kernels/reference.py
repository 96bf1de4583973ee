"""Plain-torch references of the FP8 block formats (DeepSeek-V3 layout).

Weights: float8_e4m3fn with one fp32 `scale_inv` (the dequantisation multiplier, amax/448) per 128x128 block;
ragged edge blocks are scaled over their real elements. Activations: one scale per 1x128 tile of the last dim.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0


def _blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, int, int]:
    """Zero-pad [N, K] to whole blocks and view it as [N/b, b, K/b, b]."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = torch.nn.functional.pad(w, (0, kb * block - k, 0, nb * block - n))
    return padded.view(nb, block, kb, block), n, k


def weight_quant(w: torch.Tensor, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    blocks, n, k = _blocks(w.float(), block_size)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.view(blocks.shape[0] * block_size, -1)[:n, :k].contiguous()
    return q, scale_inv.float()


def weight_dequant(q: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = q.shape
    expected = (-(-n // block_size), -(-k // block_size))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {n}x{k} "
                         f"in {block_size}x{block_size} blocks (expected {expected})")
    s = scale_inv.float().repeat_interleave(block_size, 0)[:n].repeat_interleave(block_size, 1)[:, :k]
    return (q.float() * s).to(dtype)


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[-1] % block_size:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of block_size {block_size}")
    tiles = x.float().unflatten(-1, (-1, block_size))
    scale = tiles.abs().amax(-1).clamp(min=1e-4) / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (tiles / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), scale


def fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale_inv: torch.Tensor,
             block_size: int = 128, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """C[M, N] = A[M, K] B[N, K]^T from FP8 operands: A with one scale per 1x128 tile, B with one per 128x128
    block, accumulated in fp32 one K-block at a time (each block's partial product scaled before it is added)."""
    M, K = a_q.shape
    kb = -(-K // block_size)
    out = torch.zeros(M, b_q.shape[0], dtype=torch.float32, device=a_q.device)
    b_rows = b_scale_inv.float().repeat_interleave(block_size, 0)[: b_q.shape[0]]  # [N, K/128]
    for k in range(kb):
        sl = slice(k * block_size, min((k + 1) * block_size, K))
        part = a_q[:, sl].float() @ b_q[:, sl].float().T
        out += part * a_scale[:, k: k + 1].float() * b_rows[None, :, k]
    return out.to(out_dtype or torch.get_default_dtype())


# ---------------------------------------------------------------------------------------------- MXFP4
# E2M1 codes 0..7 (bit 3 is the sign): 0, 0.5, 1, 1.5, 2, 3, 4, 6.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Round to nearest, ties to the even code: a magnitude moves past a midpoint when it is greater than it
# (tie goes down to an even code) or at least it (tie goes up to an even code).
E2M1_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
MX_BLOCK = 32


def _e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    mag = v.abs()
    code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for mid, tie_up in E2M1_MIDPOINTS:
        code += (mag >= mid if tie_up else mag > mid).to(torch.uint8)
    return code | ((v < 0).to(torch.uint8) << 3)


def mxfp4_quant(w: torch.Tensor, block_size: int = MX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 (OCP microscaling, as DeepSeek-V4's routed experts): per 1x32 block along the last dim a
    power-of-two scale s = 2^ceil(log2(amax / 6)) stored as its e8m0 byte (exponent + 127), and the values
    w / s as E2M1 codes, two per byte, the even element in the low nibble. Returns (packed [..., K/2] uint8,
    scales [..., K/32] uint8)."""
    if w.shape[-1] % block_size:
        raise ValueError(f"last dim {w.shape[-1]} is not a multiple of the MXFP4 block {block_size}")
    blocks = w.float().unflatten(-1, (-1, block_size))
    amax = blocks.abs().amax(-1).clamp(min=6.0 * 2.0 ** -126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    codes = _e2m1_codes((blocks / torch.exp2(exp)[..., None]).clamp(-6.0, 6.0)).flatten(-2)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), (exp + 127).to(torch.uint8)


def mxfp4_dequant(packed: torch.Tensor, scales: torch.Tensor, block_size: int = MX_BLOCK,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    K = packed.shape[-1] * 2
    if scales.shape[-1] * block_size != K or scales.shape[:-1] != packed.shape[:-1]:
        raise ValueError(f"MXFP4 scales {tuple(scales.shape)} do not match packed values {tuple(packed.shape)} "
                         f"(one scale per {block_size} values)")
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).long()
    table = torch.tensor(E2M1_VALUES, device=packed.device)
    values = table[codes & 7] * (1 - 2 * (codes >> 3)).float()
    scale = torch.exp2(scales.float() - 127).repeat_interleave(block_size, -1)
    return (values * scale).to(dtype)


def mxfp4_gemm(a: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, a_scale: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """C[M, N] = A[M, K] W[N, K]^T with W in MXFP4; A in bf16/fp32, or FP8 with `a_scale` per 1x128 tile."""
    if a_scale is not None:
        a = (a.float().unflatten(-1, (-1, 128)) * a_scale.float()[..., None]).flatten(-2)
    return (a.float() @ mxfp4_dequant(packed, scales).T).to(out_dtype or torch.get_default_dtype())


def mxfp4_fake_quant(w: torch.Tensor) -> torch.Tensor:
    """w rounded through MXFP4 and back (QAT's forward weights)."""
    return mxfp4_dequant(*mxfp4_quant(w), dtype=w.dtype)


# ----------------------------------------------------------------------------------- grouped GEMM
def grouped_gemm(x_sorted: torch.Tensor, weights: torch.Tensor, group_sizes: torch.Tensor | list[int]) -> torch.Tensor:
    """Rows of `x_sorted` [T, K] grouped by expert (group e has `group_sizes[e]` rows, in expert order) times
    that expert's `weights[e]` [N, K] transposed: [T, N]."""
    sizes = [int(s) for s in group_sizes]
    if sum(sizes) != x_sorted.shape[0] or len(sizes) != weights.shape[0]:
        raise ValueError(f"group_sizes sum to {sum(sizes)} over {len(sizes)} groups, but x has {x_sorted.shape[0]} "
                         f"rows and there are {weights.shape[0]} experts")
    out = x_sorted.new_empty(x_sorted.shape[0], weights.shape[1])
    start = 0
    for e, n in enumerate(sizes):
        if n:
            torch.mm(x_sorted[start: start + n], weights[e].T, out=out[start: start + n])
        start += n
    return out


# ------------------------------------------------------------------------------------ FP8 attention
def _fp8_block(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block quantised with one scale (amax/448); returns the dequantised block and whether it was finite."""
    amax = x.abs().amax()
    scale = amax.clamp(min=1e-12) / FP8_MAX
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.float() * scale, bool(torch.isfinite(amax))


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, block_m: int = 64,
                  block_n: int = 64, sm_scale: float | None = None) -> tuple[torch.Tensor, int]:
    """Softmax attention with QK^T and PV in FP8: q [B, H, S, D], k [B, H, S, D], v [B, H, S, Dv] -> (out, fallbacks).

    Flash-style over key blocks with an online softmax. Each q, k and v block is quantised to e4m3 with its
    own scale (descaled after the fp32-accumulated product); the probabilities P (in [0, 1]) use the fixed
    scale 1/448. A block pair whose FP8 scores are not finite (a non-finite or overflowing q or k block: its
    scale then spreads NaN over the whole block) is recomputed from bf16-rounded inputs; `fallbacks` counts
    those blocks. So one bad key poisons only the queries that attend to it, as in exact attention, not its
    whole block. (A non-finite value poisons PV in any precision, so PV has no fallback.)"""
    B, H, S, D = q.shape
    scale = sm_scale if sm_scale is not None else D ** -0.5
    out = torch.empty(B, H, S, v.shape[-1], dtype=torch.float32, device=q.device)
    fallbacks = 0
    for b in range(B):
        for h in range(H):
            for i in range(0, S, block_m):
                qi = q[b, h, i: i + block_m].float()
                qd, q_ok = _fp8_block(qi)
                m = torch.full((qi.shape[0],), -math.inf, device=q.device)
                l = torch.zeros(qi.shape[0], device=q.device)
                acc = torch.zeros(qi.shape[0], v.shape[-1], device=q.device)
                for j in range(0, (i + qi.shape[0]) if causal else S, block_n):
                    kj, vj = k[b, h, j: j + block_n].float(), v[b, h, j: j + block_n].float()
                    kd, k_ok = _fp8_block(kj)
                    s = qd @ kd.T
                    if not (q_ok and k_ok and torch.isfinite(s).all()):
                        s, fallbacks = _bf16(qi) @ _bf16(kj).T, fallbacks + 1
                    s = s * scale
                    if causal:
                        rows = torch.arange(i, i + qi.shape[0], device=q.device)[:, None]
                        s = s.masked_fill(torch.arange(j, j + kj.shape[0], device=q.device)[None, :] > rows, -math.inf)
                    m_new = torch.maximum(m, s.amax(-1))
                    alpha = torch.where(m == -math.inf, 0.0, torch.exp(m - m_new))  # nothing accumulated yet
                    p = torch.exp(s - m_new[:, None])
                    l = l * alpha + p.sum(-1)
                    vd, _ = _fp8_block(vj)
                    pd = (p * FP8_MAX).to(torch.float8_e4m3fn).float() / FP8_MAX
                    acc = acc * alpha[:, None] + pd @ vd
                    m = m_new
                out[b, h, i: i + block_m] = acc / l[:, None]
    return out.to(q.dtype), fallbacks
