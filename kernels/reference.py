"""Plain-torch references of the FP8 block formats (DeepSeek-V3 layout).

Weights: float8_e4m3fn with one fp32 `scale_inv` (the dequantisation multiplier, amax/448) per 128x128 block;
ragged edge blocks are scaled over their real elements. Activations: one scale per 1x128 tile of the last dim.
"""

from __future__ import annotations

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
