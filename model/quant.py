"""Low-precision training modes, applied around the network (which itself knows nothing of them).

`fp8`: DeepSeek-V3's mixed-precision scheme. Every MLA projection, dense/shared-expert SwiGLU projection and
routed expert computes with FP8 e4m3 operands, in the forward and in both backward GEMMs: activations quantised
per 1x128 tile, weights per 128x128 block, fp32 accumulation (`dspost.kernels.fp8_gemm`). Master weights,
optimizer state, embedding, output head, router, norms and attention stay in the working precision.

`fp4-qat`: DeepSeek-V4's quantisation-aware training of the routed experts: the forward uses the expert
weights rounded through MXFP4 (E2M1 values, one power-of-two scale per 32 inputs), the gradient passes
straight through to the fp32 master weights. Combine both with `fp8+fp4-qat`.

A projection whose input width is not a multiple of 128 (the 1x128 activation tile) keeps full precision."""

from __future__ import annotations

import torch
from torch import nn

from dspost import kernels

MODES = ("none", "fp8", "fp4-qat", "fp8+fp4-qat")
FP8_LINEARS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
               "gate_proj", "up_proj", "down_proj")


def _dequant_act(q: torch.Tensor, s: torch.Tensor, dtype) -> torch.Tensor:
    return (q.float().unflatten(-1, (-1, 128)) * s[..., None]).flatten(-2).to(dtype)


class _Fp8Matmul(torch.autograd.Function):
    """y = x W^T with both operands in FP8, and the two backward GEMMs in FP8 too (DeepSeek-V3's Fprop, Dgrad
    and Wgrad), all with fp32 accumulation.

    Dgrad dx = g W: g quantised per 1x128 tile along the outputs, W^T keeping W's 128x128 block scales
    (a square block transposes onto itself). Wgrad dW = g^T x over the tokens: g^T per 1x128 tile along the
    tokens, the saved FP8 x transposed and requantised per 128x128 block (tokens zero-padded to a multiple of
    128). A GEMM whose reduction width is not a multiple of 128 falls back to the working precision on the
    dequantised operands."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xq, xs = kernels.act_quant(x2d.detach())
        wq, ws = kernels.weight_quant(w.detach())
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.dtype = x2d.dtype
        return kernels.fp8_gemm(xq, xs, wq, ws, out_dtype=x2d.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xq, xs, wq, ws = ctx.saved_tensors
        g = g.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0] and g.shape[1] % 128 == 0:
            gq, gs = kernels.act_quant(g)
            dx = kernels.fp8_gemm(gq, gs, wq.t().contiguous(), ws.t().contiguous(), out_dtype=ctx.dtype)
        elif ctx.needs_input_grad[0]:
            dx = g @ kernels.weight_dequant(wq, ws, dtype=ctx.dtype)
        if not ctx.needs_input_grad[1]:  # frozen weights (LoRA base): no Wgrad
            return dx, dw
        pad = -g.shape[0] % 128
        gT = torch.nn.functional.pad(g.t().float(), (0, pad)).contiguous()
        xT = torch.nn.functional.pad(_dequant_act(xq, xs, torch.float32).t(), (0, pad)).contiguous()
        (gTq, gTs), (xTq, xTs) = kernels.act_quant(gT), kernels.weight_quant(xT)
        dw = kernels.fp8_gemm(gTq, gTs, xTq, xTs, out_dtype=ctx.dtype)
        return dx, dw


def fp8_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] times w [N, K]^T through FP8."""
    return _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])


class Fp8Linear(nn.Linear):
    """An `nn.Linear` whose forward runs through FP8 (same parameters and state-dict names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_matmul(x, self.weight)
        return y if self.bias is None else y + self.bias


def fp8_grouped_mm(x_ND: torch.Tensor, w_EOD: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The routed experts' grouped product with every expert's GEMM in FP8."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            outs.append(fp8_matmul(x_ND[start: start + n], w_EOD[e]))
        start += n
    return torch.cat(outs) if outs else x_ND.new_zeros(0, w_EOD.shape[1])


class _FakeMxfp4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        return kernels.mxfp4_fake_quant(w.detach())

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g  # straight through to the master weights


def fp4_qat_weights(w_EOD: torch.Tensor) -> torch.Tensor:
    return _FakeMxfp4.apply(w_EOD)


def _experts_mm(base, fp4: bool):
    def grouped_mm(x_ND, w_EOD, counts):
        return base(x_ND, fp4_qat_weights(w_EOD) if fp4 else w_EOD, counts)
    return grouped_mm


def apply_training_precision(model: nn.Module, mode: str) -> nn.Module:
    """Switch `model` (our DeepseekV3, possibly under a PEFT or reward-head wrapper) into `mode`, in place."""
    if mode not in MODES:
        raise ValueError(f"training precision {mode!r}: expected one of {MODES}")
    if mode == "none":
        return model
    from dspost.model.deepseek_v3 import RoutedExperts

    fp8, fp4 = "fp8" in mode, "fp4-qat" in mode
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if fp8 and type(module) is nn.Linear and leaf in FP8_LINEARS and module.in_features % 128 == 0:
            module.__class__ = Fp8Linear
        if isinstance(module, RoutedExperts):
            if fp4 and module.gate_up_proj.shape[-1] % kernels.MX_BLOCK:
                raise ValueError(f"{name}: expert input width {module.gate_up_proj.shape[-1]} is not a multiple of "
                                 f"the MXFP4 block {kernels.MX_BLOCK}")
            fp8_ok = fp8 and module.gate_up_proj.shape[-1] % 128 == 0 and module.down_proj.shape[-1] % 128 == 0
            base = fp8_grouped_mm if fp8_ok else RoutedExperts.grouped_mm
            module.grouped_mm = _experts_mm(base, fp4)
    return model


# ------------------------------------------------------------------------------- grouped GEMM kernel
class _KernelGroupedMM(torch.autograd.Function):
    """The routed experts' products through a one-launch grouped GEMM (`gemm`: dspost.kernels.grouped_gemm,
    Triton on CUDA): forward and input gradient as grouped GEMMs, weight gradient per expert."""

    @staticmethod
    def forward(ctx, x_ND, w_EOD, counts, gemm):
        ctx.save_for_backward(x_ND, w_EOD)
        ctx.counts, ctx.gemm = counts, gemm
        return gemm(x_ND.contiguous(), w_EOD.contiguous(), counts)

    @staticmethod
    def backward(ctx, g_NO):
        x_ND, w_EOD = ctx.saved_tensors
        g_NO = g_NO.contiguous()
        gx = ctx.gemm(g_NO, w_EOD.transpose(1, 2).contiguous(), ctx.counts) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            gw = torch.zeros_like(w_EOD)
            start = 0
            for e, n in enumerate(ctx.counts):
                if n:
                    torch.mm(g_NO[start: start + n].t(), x_ND[start: start + n], out=gw[e])
                start += n
        return gx, gw, None, None


def use_grouped_gemm(model: nn.Module, gemm=None) -> nn.Module:
    """Route every routed-expert product of `model` through a grouped GEMM (default: `dspost.kernels.
    grouped_gemm`, which is Triton on CUDA and the reference elsewhere), in place. Trainers call it for CUDA
    models; on the CPU the model's own per-expert path is as fast."""
    from dspost.model.deepseek_v3 import RoutedExperts

    gemm = gemm or kernels.grouped_gemm
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            module.grouped_mm = lambda x, w, counts: _KernelGroupedMM.apply(x, w, counts, gemm)
    return model
