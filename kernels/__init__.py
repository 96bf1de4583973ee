"""FP8 / FP4 ops in DeepSeek's formats. Each op has a plain-torch reference (`reference.py`) and a Triton kernel
(`triton_ops.py`); the functions here dispatch: Triton for CUDA tensors when Triton is installed, the reference
elsewhere (CPU). Tests run the Triton kernels on the CPU through Triton's interpreter (`TRITON_INTERPRET=1`)."""

from __future__ import annotations

import torch

from dspost.kernels import reference
from dspost.kernels.reference import E2M1_VALUES, FP8_MAX, MX_BLOCK, mxfp4_fake_quant


def _backend(*tensors: torch.Tensor):
    if all(t.is_cuda for t in tensors):
        try:
            from dspost.kernels import triton_ops
        except ImportError:  # no Triton on this machine: the reference serves CUDA tensors too
            return reference
        return triton_ops
    return reference


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None):
    """x [..., K] -> (FP8 e4m3 values, fp32 scale per 1x`block_size` tile [..., K/block_size])."""
    return _backend(x).act_quant(x, block_size, scale_fmt)


def weight_quant(w: torch.Tensor, block_size: int = 128):
    """w [N, K] -> (FP8 e4m3 values, fp32 `scale_inv` per block [ceil(N/b), ceil(K/b)])."""
    return _backend(w).weight_quant(w, block_size)


def weight_dequant(q: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128, dtype: torch.dtype = torch.float32):
    return _backend(q, scale_inv).weight_dequant(q, scale_inv, block_size, dtype)


def fp8_gemm(a_q, a_scale, b_q, b_scale_inv, out_dtype: torch.dtype | None = None):
    """A [M, K] (FP8, 1x128 scales) times B [N, K]^T (FP8, 128x128 `scale_inv`), fp32 accumulation."""
    return _backend(a_q, b_q).fp8_gemm(a_q, a_scale, b_q, b_scale_inv, out_dtype=out_dtype)


def mxfp4_quant(w: torch.Tensor):
    """w [..., K] -> (packed E2M1 pairs [..., K/2] uint8, e8m0 scale bytes [..., K/32] uint8)."""
    return _backend(w).mxfp4_quant(w)


def mxfp4_dequant(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32):
    return _backend(packed, scales).mxfp4_dequant(packed, scales, dtype=dtype)


def mxfp4_gemm(a, packed, scales, a_scale=None, out_dtype: torch.dtype | None = None):
    """A [M, K] (bf16/fp32, or FP8 with `a_scale`) times W [N, K]^T in MXFP4, dequantised inside the kernel."""
    return _backend(a, packed).mxfp4_gemm(a, packed, scales, a_scale, out_dtype=out_dtype)


def grouped_gemm(x_sorted: torch.Tensor, weights: torch.Tensor, group_sizes):
    """Rows sorted by expert [T, K] times each expert's weights [E, N, K]^T, in one launch on CUDA."""
    return _backend(x_sorted, weights).grouped_gemm(x_sorted, weights, group_sizes)


def fp8_attention(q, k, v, causal: bool = True, sm_scale: float | None = None):
    """Attention [B, H, S, D] with QK^T and PV in FP8 (per-block scales), blocks whose FP8 scores are not
    finite recomputed in bf16 -> (out, number of recomputed blocks)."""
    return _backend(q, k, v).fp8_attention(q, k, v, causal=causal, sm_scale=sm_scale)


__all__ = ["E2M1_VALUES", "FP8_MAX", "MX_BLOCK", "act_quant", "fp8_attention", "fp8_gemm", "grouped_gemm", "mxfp4_dequant",
           "mxfp4_fake_quant", "mxfp4_gemm", "mxfp4_quant", "reference", "weight_dequant", "weight_quant"]
