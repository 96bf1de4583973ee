"""DeepSeek-V3 family in PyTorch, in paper order: config, RMSNorm, RoPE/YaRN, MLA, router, MoE, block, MTP, model.

Module names follow the Hugging Face checkpoint (`q_a_proj`, `kv_a_proj_with_mqa`, `mlp.gate`...), so a
state dict is one rename away from the hub layout (see `checkpoint.py`). Routed experts are stacked 3-D
parameters like transformers v5 (`gate_up_proj` [E, 2F, D], `down_proj` [E, D, F]).

Beyond plain V3 (each off by default, so a V3 `config.json` gives V3): V4's `sqrtsoftplus` scoring,
hash-routed first MoE layers and SwiGLU clamping; V3.5's drift-corrected balancing bias and staggered MTP
horizons; routing replay. The model knows nothing of parallelism or quantisation: the expert matmuls go
through one seam, `RoutedExperts.grouped_mm`, that `kernels/` can replace.

Shape legend: B batch, S sequence, T tokens (B*S), D hidden, H heads, E routed experts, K experts per
token, F expert width, C kv latent rank, R rope dims, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------------------------- config
@dataclass(frozen=True, kw_only=True)
class ModelArgs:
    """Field names are those of a Hugging Face `config.json` (`model_type: deepseek_v3`)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # mla
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # moe
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    # rope / yarn
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 163840
    # misc
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    # --- dspost extensions; defaults reproduce plain V3 -------------------------------------------
    num_hash_layers: int = 0
    """V4: the first `num_hash_layers` MoE layers route by a fixed token-id -> experts table (`tid2eid`)."""
    swiglu_limit: float | None = None
    """V4: clamp the SwiGLU linear part to [-limit, limit] and cap the gate at limit."""
    mtp_offsets: tuple[int, ...] | None = None
    """V3.5 staggered horizons: MTP module k predicts token t+1+offsets[k] (V3: offsets 1..D). vLLM's
    MTP speculative decoding ("deepseek_mtp") only uses the V3 layout, offsets (1, 2, ..., D)."""
    mtp_horizon_warmup: int = 0
    """Staggered MTP: steps over which each longer horizon's loss weight ramps in, one after another."""
    drift_reset_interval: int = 0
    """V3.5 drift correction: the balancing bias is a stable part plus a corrective part reset every this
    many updates (0 = plain V3 single bias)."""

    HF_EXTRA_KEYS = ("num_hash_layers", "swiglu_limit", "mtp_offsets", "mtp_horizon_warmup", "drift_reset_interval")

    def __post_init__(self):
        if self.scoring_func not in ("sigmoid", "softmax", "sqrtsoftplus"):
            raise ValueError(f"scoring_func: unknown {self.scoring_func!r} (sigmoid, softmax, sqrtsoftplus)")
        if self.n_routed_experts % max(self.n_group, 1):
            raise ValueError(f"n_routed_experts {self.n_routed_experts} is not divisible by n_group {self.n_group}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError("num_experts_per_tok exceeds n_routed_experts")
        if self.mtp_offsets is not None and len(self.mtp_offsets) != self.num_nextn_predict_layers:
            raise ValueError("mtp_offsets needs one offset per MTP layer (num_nextn_predict_layers)")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in names}
        rope = cfg.get("rope_parameters")  # transformers v5 spelling
        if rope and "rope_scaling" not in cfg:
            kw["rope_theta"] = rope.get("rope_theta", kw.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                kw["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if kw.get("q_lora_rank") == 0:
            kw["q_lora_rank"] = None
        if kw.get("mtp_offsets") is not None:
            kw["mtp_offsets"] = tuple(kw["mtp_offsets"])
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in self.HF_EXTRA_KEYS:  # write our extensions only when used, so plain V3 stays plain
            if d[k] == getattr(ModelArgs, k):
                d.pop(k)
        if d.get("mtp_offsets") is not None:
            d["mtp_offsets"] = list(d["mtp_offsets"])
        d.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            num_key_value_heads=self.num_attention_heads,
            rope_interleave=True,
            attention_bias=False,
            use_cache=True,
        )
        unsupported = self.vllm_unsupported()
        if unsupported:
            d["dspost_vllm_unsupported"] = unsupported
        return d

    def replace(self, **kw) -> "ModelArgs":
        return dataclasses.replace(self, **kw)

    @property
    def offsets(self) -> tuple[int, ...]:
        return self.mtp_offsets or tuple(range(1, self.num_nextn_predict_layers + 1))

    def vllm_unsupported(self) -> list[str]:
        """Features vLLM's DeepseekV3 path would silently serve as a different model."""
        out = []
        if self.num_hash_layers:
            out.append("num_hash_layers (hash routing)")
        if self.swiglu_limit is not None:
            out.append("swiglu_limit (SwiGLU clamp)")
        if self.scoring_func != "sigmoid" or self.topk_method != "noaux_tc":
            out.append(f"scoring_func={self.scoring_func}/topk_method={self.topk_method} (vLLM needs sigmoid + noaux_tc)")
        return out

    def vllm_speculative_unsupported(self) -> list[str]:
        return ["mtp_offsets (staggered MTP)"] if self.offsets != tuple(range(1, len(self.offsets) + 1)) else []


# --------------------------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale: the order HF and vLLM use.
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] (YaRN-interpolated when `rope_scaling` is yarn) and the cos/sin factor."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rs = args.rope_scaling or {}
    if rs.get("type", rs.get("rope_type")) not in ("yarn", "deepseek_yarn"):
        return inv_freq.float(), 1.0
    factor, orig = rs["factor"], rs["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs.get("beta_fast", 32))), 0)
    high = min(math.ceil(correction_dim(rs.get("beta_slow", 1))), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attn_factor = yarn_mscale(factor, rs.get("mscale", 1)) / yarn_mscale(factor, rs.get("mscale_all_dim", 0))
    return inv_freq.float(), attn_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) -- the layout of DeepSeek's rope weight slices."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, inter: int, limit: float | None = None):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None) -> torch.Tensor:
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


# ------------------------------------------------------------------------------------------------ MLA
@dataclass
class KVCache:
    """Latent cache of the absorbed decode path: only c_kv [B, S, C] and rotated k_pe [B, S, R] per layer."""

    c_kv: list[torch.Tensor]
    k_pe: list[torch.Tensor]
    valid: torch.Tensor  # [B, S_max] bool: which cache slots hold real (non-padding) tokens
    length: int = 0

    @classmethod
    def empty(cls, args: ModelArgs, batch: int, max_len: int, device, dtype) -> "KVCache":
        n = args.num_hidden_layers
        return cls(
            c_kv=[torch.zeros(batch, max_len, args.kv_lora_rank, device=device, dtype=dtype) for _ in range(n)],
            k_pe=[torch.zeros(batch, max_len, args.qk_rope_head_dim, device=device, dtype=dtype) for _ in range(n)],
            valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
        )


@dataclass
class Segments:
    """Packed rows (several sequences per row, `segment_ids` -1 on padding) seen as their sequences, so that
    attention runs per sequence, causal and padded to the longest, instead of over whole rows under a
    block-diagonal mask, which spends most of its work on pairs it masks out."""

    index: torch.Tensor  # [N, L] flat (row * S + column) index of each sequence's tokens; 0 past its end
    tokens: torch.Tensor  # [T] flat indices of all real tokens, row-major
    slots: torch.Tensor  # [T] where each real token sits in the flattened [N, L]

    @classmethod
    def of(cls, segment_ids: torch.Tensor) -> "Segments":
        S = segment_ids.shape[1]
        flat = segment_ids.flatten()
        tokens = (flat >= 0).nonzero()[:, 0]
        # A sequence is a run of one (row, segment) pair: segments are contiguous within a row.
        _, seq, counts = torch.unique_consecutive(tokens // S * S + flat[tokens], return_inverse=True,
                                                  return_counts=True)
        pos = torch.arange(len(tokens), device=flat.device) - (counts.cumsum(0) - counts)[seq]
        L = int(counts.max())
        index = torch.zeros(len(counts) * L, dtype=torch.long, device=flat.device)
        index[seq * L + pos] = tokens
        return cls(index.view(-1, L), tokens, seq * L + pos)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """SDPA of [B, S, H, d] rows, per sequence; padding tokens get zeros."""
        B, S, H, _ = q.shape
        N, L = self.index.shape

        # index_select, not advanced indexing: its backward is an index_add, several times faster here.
        def per_sequence(x: torch.Tensor) -> torch.Tensor:  # [N, H, L, d]
            return x.reshape(B * S, -1).index_select(0, self.index.flatten()).view(N, L, H, -1).transpose(1, 2)

        # Queries past a sequence's end read token 0; causal attention keeps every real query off them.
        o = F.scaled_dot_product_attention(per_sequence(q), per_sequence(k), per_sequence(v), is_causal=True,
                                           scale=scale)
        o = o.transpose(1, 2).reshape(N * L, -1).index_select(0, self.slots)
        return o.new_zeros(B * S, o.shape[-1]).index_copy(0, self.tokens, o).view(B, S, H, -1)


class MLA(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        H, dn, dr, dv, C = (args.num_attention_heads, args.qk_nope_head_dim, args.qk_rope_head_dim,
                            args.v_head_dim, args.kv_lora_rank)
        D = args.hidden_size
        if args.q_lora_rank:
            self.q_a_proj = nn.Linear(D, args.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
            self.q_b_proj = nn.Linear(args.q_lora_rank, H * (dn + dr), bias=False)
        else:
            self.q_proj = nn.Linear(D, H * (dn + dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, C + dr, bias=False)
        self.kv_a_layernorm = RMSNorm(C, args.rms_norm_eps)
        self.kv_b_proj = nn.Linear(C, H * (dn + dv), bias=False)
        self.o_proj = nn.Linear(H * dv, D, bias=False)
        self.softmax_scale = (dn + dr) ** -0.5
        rs = args.rope_scaling or {}
        if rs.get("mscale_all_dim"):
            self.softmax_scale *= yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2

    def _q(self, x: torch.Tensor) -> torch.Tensor:
        if self.args.q_lora_rank:
            return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return self.q_proj(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: "torch.Tensor | Segments | None", cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        a = self.args
        B, S, _ = x.shape
        H, dn, dr, dv, C = a.num_attention_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
        q = self._q(x).view(B, S, H, dn + dr)
        q_nope, q_pe = q.split([dn, dr], dim=-1)
        q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None])
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([C, dr], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = apply_rope(k_pe, cos, sin)
        if cache is None:
            # Naive (MHA) form for training and prefill: expand the latent to per-head keys and values.
            k_nope, v = self.kv_b_proj(c_kv).view(B, S, H, dn + dv).split([dn, dv], dim=-1)
            k = torch.cat([k_nope, k_pe[:, :, None].expand(B, S, H, dr)], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1)
            if isinstance(mask, Segments):
                o = mask.attend(q, k, v, self.softmax_scale)
            else:
                o = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                    attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale,
                ).transpose(1, 2)
        else:
            o = self._absorbed(q_nope, q_pe, c_kv, k_pe, mask, cache, layer)
        return self.o_proj(o.reshape(B, S, H * dv))

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask, cache: KVCache, layer: int) -> torch.Tensor:
        """Decode form: fold kv_b_proj into q and the output, attend over the cached latent."""
        a = self.args
        start, end = cache.length, cache.length + q_nope.shape[1]
        cache.c_kv[layer][:, start:end] = c_kv
        cache.k_pe[layer][:, start:end] = k_pe
        w = self.kv_b_proj.weight.view(a.num_attention_heads, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w[:, : a.qk_nope_head_dim])
        scores = (torch.einsum("bshc,btc->bsht", q_lat, cache.c_kv[layer][:, :end])
                  + torch.einsum("bshr,btr->bsht", q_pe, cache.k_pe[layer][:, :end])) * self.softmax_scale
        scores = scores.float().masked_fill(~mask[:, :, None, :end], float("-inf"))
        p = scores.softmax(dim=-1).to(q_nope.dtype)
        o_lat = torch.einsum("bsht,btc->bshc", p, cache.c_kv[layer][:, :end])
        return torch.einsum("bshc,hdc->bshd", o_lat, w[:, a.qk_nope_head_dim:])


# --------------------------------------------------------------------------------------------- router
class Gate(nn.Module):
    """Scores in fp32; the correction bias only selects experts, weights come from the unbiased scores."""

    def __init__(self, args: ModelArgs, hash_routed: bool = False):
        super().__init__()
        self.args = args
        E = args.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, args.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        self.hash_routed = hash_routed
        if hash_routed:
            self.register_buffer("tid2eid", torch.zeros(args.vocab_size, args.num_experts_per_tok, dtype=torch.long))
        # Balancing state, outside autograd and outside the checkpoint.
        self.register_buffer("load_E", torch.zeros(E, dtype=torch.float32), persistent=False)
        self.register_buffer("window_load_E", torch.zeros(E, dtype=torch.float32), persistent=False)
        self.register_buffer("corrective_E", torch.zeros(E, dtype=torch.float32), persistent=False)
        self.updates = 0
        self.last_load_E: torch.Tensor | None = None

    FP32_BUFFERS = ("e_score_correction_bias", "load_E", "window_load_E", "corrective_E")

    def _apply(self, fn, recurse=True):
        # Model-wide dtype casts move these buffers but keep them fp32 (as HF and vLLM do).
        kept = {n: self._buffers.pop(n) for n in self.FP32_BUFFERS}
        super()._apply(fn, recurse)
        for n, t in kept.items():
            moved = fn(t)
            self._buffers[n] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    def scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x_TD.float(), self.weight.float())
        if self.args.scoring_func == "sigmoid":
            return logits.sigmoid()
        if self.args.scoring_func == "softmax":
            return logits.softmax(dim=-1)
        return F.softplus(logits).sqrt()

    def select(self, s_TE: torch.Tensor) -> torch.Tensor:
        a = self.args
        biased = a.topk_method == "noaux_tc"
        s = s_TE + self.e_score_correction_bias if biased else s_TE
        if a.n_group > 1:
            grouped = s.view(s.shape[0], a.n_group, -1)
            group_score = grouped.topk(2, dim=-1)[0].sum(-1) if biased else grouped.amax(-1)
            keep = group_score.topk(a.topk_group, dim=-1)[1]
            mask = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
            s = grouped.masked_fill(mask[..., None], float("-inf")).flatten(1)
        return s.topk(a.num_experts_per_tok, dim=-1)[1]

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None,
                replay_TK: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s_TE = self.scores(x_TD)
        if replay_TK is not None:
            idx_TK = replay_TK.to(s_TE.device).long()
        elif self.hash_routed:
            if token_ids_T is None:
                raise ValueError("hash-routed layer needs the input token ids")
            idx_TK = self.tid2eid[token_ids_T]
        else:
            with torch.no_grad():
                idx_TK = self.select(s_TE)
        w_TK = s_TE.gather(1, idx_TK)
        if self.args.norm_topk_prob:
            w_TK = w_TK / (w_TK.sum(-1, keepdim=True) + 1e-20)
        w_TK = w_TK * self.args.routed_scaling_factor
        with torch.no_grad():
            load = torch.bincount(idx_TK.flatten(), minlength=self.args.n_routed_experts).float()
            self.last_load_E = load
            if self.training:
                self.load_E += load
        return w_TK, idx_TK, s_TE

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """Aux-loss-free balancing: b += gamma * sign(mean load - load_e), with V3.5 drift correction."""
        load = self.load_E
        self.load_E = torch.zeros_like(load)
        if gamma <= 0 or self.hash_routed or load.sum() == 0:
            return
        step = gamma * torch.sign(load.mean() - load)
        self.e_score_correction_bias += step
        interval = self.args.drift_reset_interval
        if not interval:
            return
        self.corrective_E += step
        self.window_load_E += load
        self.updates += 1
        if self.updates % interval == 0:
            # The stable part moves once per window by the window's total load; the short-horizon
            # corrective part is dropped so its noise cannot accumulate.
            w = self.window_load_E
            self.e_score_correction_bias += gamma * torch.sign(w.mean() - w) - self.corrective_E
            self.corrective_E.zero_()
            self.window_load_E.zero_()


# ------------------------------------------------------------------------------------------------ MoE
class GroupedMM(torch.autograd.Function):
    """Per-expert matmuls over contiguous row groups, written into preallocated outputs: one autograd
    node for all experts instead of one per slice (7x faster fwd+bwd than slicing + cat on CPU)."""

    @staticmethod
    def forward(ctx, x_ND, w_EOD, counts):
        out = x_ND.new_empty(x_ND.shape[0], w_EOD.shape[1])
        for e, rows in _groups(counts):
            torch.mm(x_ND[rows], w_EOD[e].t(), out=out[rows])
        ctx.save_for_backward(x_ND, w_EOD)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, g_NO):
        x_ND, w_EOD = ctx.saved_tensors
        g_NO = g_NO.contiguous()
        gx = torch.empty_like(x_ND) if ctx.needs_input_grad[0] else None
        gw = torch.zeros_like(w_EOD) if ctx.needs_input_grad[1] else None
        for e, rows in _groups(ctx.counts):
            if gx is not None:
                torch.mm(g_NO[rows], w_EOD[e], out=gx[rows])
            if gw is not None:
                torch.mm(g_NO[rows].t(), x_ND[rows], out=gw[e])
        return gx, gw, None


def _groups(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
            start += n


class RoutedExperts(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        E, F_, D = args.n_routed_experts, args.moe_intermediate_size, args.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F_, D))  # gate rows, then up rows
        self.down_proj = nn.Parameter(torch.empty(E, D, F_))
        self.limit = args.swiglu_limit

    @staticmethod
    def grouped_mm(x_ND: torch.Tensor, w_EOD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows of x are sorted by expert, counts[e] rows each: y[rows of e] = x[rows of e] @ w[e]^T.

        The seam that `kernels/` replaces with a fused or quantised grouped GEMM."""
        return GroupedMM.apply(x_ND, w_EOD, counts)

    def forward(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        T, K = idx_TK.shape
        flat = idx_TK.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        token_N = order // K
        x_ND = x_TD[token_N]
        gate, up = self.grouped_mm(x_ND, self.gate_up_proj, counts).chunk(2, dim=-1)
        h_NF = swiglu(gate, up, self.limit) * w_TK.flatten()[order, None].to(x_TD.dtype)
        y_ND = self.grouped_mm(h_NF, self.down_proj, counts)
        return torch.zeros_like(x_TD).index_add_(0, token_N, y_ND)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, hash_routed: bool = False):
        super().__init__()
        self.args = args
        self.gate = Gate(args, hash_routed)
        self.experts = RoutedExperts(args)
        self.shared_experts = SwiGLU(args.hidden_size, args.n_shared_experts * args.moe_intermediate_size,
                                     args.swiglu_limit) if args.n_shared_experts else None
        self.aux_loss: torch.Tensor | None = None
        self.last_routes: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None,
                replay: torch.Tensor | None = None, balance_alpha: float = 0.0) -> torch.Tensor:
        B, S, D = x.shape
        x_TD = x.reshape(-1, D)
        ids = token_ids.reshape(-1) if token_ids is not None else None
        w_TK, idx_TK, s_TE = self.gate(x_TD, ids, replay)
        self.last_routes = idx_TK.detach()
        y = self.experts(x_TD, idx_TK, w_TK)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_TD)
        self.aux_loss = sequence_balance_loss(s_TE.view(B, S, -1), idx_TK.view(B, S, -1)) * balance_alpha \
            if balance_alpha > 0 else None
        return y.view(B, S, D)


def sequence_balance_loss(s_BSE: torch.Tensor, idx_BSK: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise loss sum_i f_i P_i, averaged over sequences."""
    B, S, E = s_BSE.shape
    K = idx_BSK.shape[-1]
    hits = torch.zeros(B, E, device=s_BSE.device).scatter_add_(1, idx_BSK.reshape(B, -1),
                                                                torch.ones(B, S * K, device=s_BSE.device))
    f_BE = hits * E / (K * S)
    p_BE = (s_BSE / s_BSE.sum(-1, keepdim=True)).mean(1)
    return (f_BE * p_BE).sum(-1).mean()


# ---------------------------------------------------------------------------------------------- block
class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = MLA(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        moe_index = layer_id - args.first_k_dense_replace
        if moe_index < 0:
            self.mlp = SwiGLU(args.hidden_size, args.intermediate_size, args.swiglu_limit)
        else:
            self.mlp = MoE(args, hash_routed=moe_index < args.num_hash_layers)

    def forward(self, h, cos, sin, mask, token_ids=None, cache=None, layer=0, replay=None, balance_alpha=0.0):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, layer)
        x = self.post_attention_layernorm(h)
        y = self.mlp(x, token_ids, replay, balance_alpha) if isinstance(self.mlp, MoE) else self.mlp(x)
        return h + y


# ------------------------------------------------------------------------------------------------ MTP
class MTPLayer(Block):
    """Multi-token prediction module: [enorm(embed(t_{i+o})); hnorm(h_i)] -> eh_proj -> block -> shared head.

    Embedding first in the concatenation, as in the released checkpoints and vLLM. Saved at
    `model.layers.{num_hidden_layers + k}`; the embedding and head are the main model's."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__(args, layer_id)
        D = args.hidden_size
        self.enorm = RMSNorm(D, args.rms_norm_eps)
        self.hnorm = RMSNorm(D, args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(D, args.rms_norm_eps)


# ---------------------------------------------------------------------------------------------- model
@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    aux_loss: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        n = args.num_hidden_layers
        self.mtp_layers = nn.ModuleList(MTPLayer(args, n + k) for k in range(args.num_nextn_predict_layers))


class DeepseekV3(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, self.rope_attn_factor = rope_frequencies(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.mtp_loss_weight = 0.3
        self.balance_alpha = 0.0
        self.source_path: str | None = None

    # ---- construction helpers
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "DeepseekV3":
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.args.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))
        for layer in self.moe_layers():
            layer.gate.e_score_correction_bias.zero_()
            if layer.gate.hash_routed:
                layer.gate.tid2eid.copy_(hash_table(self.args, gen))
        self.reset_runtime_state()
        return self

    def reset_runtime_state(self) -> None:
        """Rebuild non-checkpoint state (after `to_empty` or loading)."""
        inv_freq, self.rope_attn_factor = rope_frequencies(self.args)
        self.inv_freq = inv_freq.to(self.lm_head.weight.device)
        for layer in self.moe_layers():
            for buf in ("load_E", "window_load_E", "corrective_E"):
                setattr(layer.gate, buf, torch.zeros_like(layer.gate.e_score_correction_bias))

    def moe_layers(self) -> list[MoE]:
        blocks = list(self.model.layers) + list(self.model.mtp_layers)
        return [b.mlp for b in blocks if isinstance(b.mlp, MoE)]

    # ---- forward
    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        return (freqs.cos() * self.rope_attn_factor).to(dtype), (freqs.sin() * self.rope_attn_factor).to(dtype)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                routes: list[torch.Tensor] | None = None, mtp_weights: list[float] | None = None,
                return_hidden: bool = False, return_logits: bool = True,
                logits_at: "torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None" = None) -> ModelOutput:
        """`segment_ids` [B, S] separates packed sequences (and padding); `routes` replays expert indices
        [T, K] per MoE layer of the main stack (routing replay). With labels and `return_logits=False` the head
        runs only where a target is and `logits` is None: the same losses, without the head's work on prompt and
        padding positions. Without labels, `logits_at` (an index into [B, S]: a bool mask, or a pair of row and
        column indices) runs the head at those positions only, and `logits` is [n, vocab] in the index's order."""
        S = input_ids.shape[1]
        h, cos, sin, mask = self.trunk(input_ids, position_ids, segment_ids, routes)
        if logits_at is not None:
            if labels is not None:
                raise ValueError("logits_at selects logits to return; the loss with labels picks its own positions")
            return ModelOutput(logits=self.lm_head(self.model.norm(h[logits_at])), hidden=h if return_hidden else None)
        keep = return_logits or labels is None
        logits = self.lm_head(self.model.norm(h)) if keep else None
        out = ModelOutput(logits=logits, hidden=h if return_hidden else None)
        if labels is None:
            return out
        out.lm_loss = self._loss(self.model.norm, h, logits, labels)
        weights = mtp_weights if mtp_weights is not None else [1.0] * len(self.model.mtp_layers)
        for k, (mtp, offset) in enumerate(zip(self.model.mtp_layers, self.args.offsets)):
            if S <= offset or weights[k] == 0 or self.mtp_loss_weight == 0:
                continue
            h = self._mtp_step(mtp, h, input_ids, offset, cos, sin, mask)
            # Module k predicts t+1+offset from position t: shift labels left by `offset`.
            mtp_labels = F.pad(labels[:, offset:], (0, offset), value=-100)
            if segment_ids is not None:  # packed rows: no target from another sequence
                crosses = F.pad(segment_ids[:, offset:] != segment_ids[:, :-offset], (0, offset), value=True)
                mtp_labels = mtp_labels.masked_fill(crosses, -100)
            mtp_logits = self.lm_head(mtp.shared_head.norm(h)) if keep else None
            out.mtp_losses.append(weights[k] * self._loss(mtp.shared_head.norm, h, mtp_logits, mtp_labels))
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        out.aux_loss = torch.stack(aux).sum() if aux else None
        out.loss = out.lm_loss
        if out.mtp_losses:
            out.loss = out.loss + self.mtp_loss_weight * torch.stack(out.mtp_losses).sum() / len(self.model.mtp_layers)
        if out.aux_loss is not None:
            out.loss = out.loss + out.aux_loss
        return out

    def trunk(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
              segment_ids: torch.Tensor | None = None, routes: list[torch.Tensor] | None = None):
        """The main stack's last hidden states (before the final norm), with the rope and mask it used."""
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).expand(B, S)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, h.dtype)
        mask = Segments.of(segment_ids) if segment_ids is not None else None
        moe_i = 0
        for layer in self.model.layers:
            replay = None
            if routes is not None and isinstance(layer.mlp, MoE):
                replay, moe_i = routes[moe_i], moe_i + 1
            h = layer(h, cos, sin, mask, input_ids, replay=replay, balance_alpha=self.balance_alpha)
        return h, cos, sin, mask

    def _loss(self, norm: RMSNorm, h: torch.Tensor, logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the positions with a target; without `logits`, the head runs on
        those positions only."""
        if logits is None:
            has_target = labels != -100
            logits, labels = self.lm_head(norm(h[has_target])), labels[has_target]
        return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100)

    def _mtp_step(self, mtp: MTPLayer, h, input_ids, offset, cos, sin, mask):
        B, S, _ = h.shape
        # Embed t_{i+offset}; positions past the end see a zero embedding and carry no loss.
        shifted = F.pad(input_ids[:, offset:], (0, offset), value=0)
        e = self.model.embed_tokens(shifted)
        e[:, S - offset:] = 0
        x = mtp.eh_proj(torch.cat([mtp.enorm(e), mtp.hnorm(h)], dim=-1))
        return mtp(x, cos, sin, mask, shifted, balance_alpha=self.balance_alpha)

    def routes(self) -> list[torch.Tensor]:
        """Expert indices [T, K] chosen by each main-stack MoE layer in the last forward."""
        return [b.mlp.last_routes for b in self.model.layers if isinstance(b.mlp, MoE)]

    def save_pretrained(self, path, tokenizer=None, **kw):
        from dspost.model.checkpoint import save_pretrained
        return save_pretrained(self, path, tokenizer=tokenizer, **kw)

    # ---- balancing
    @torch.no_grad()
    def update_router_biases(self, gamma: float) -> None:
        for m in self.moe_layers():
            m.gate.update_bias(gamma)

    def expert_load(self) -> torch.Tensor:
        """Tokens per expert in the last forward, [n_moe_layers, E] (main stack)."""
        loads = [b.mlp.gate.last_load_E for b in self.model.layers if isinstance(b.mlp, MoE)]
        return torch.stack(loads) if loads and loads[0] is not None else torch.zeros(0)

    # ---- generation (absorbed-latent decode path with a KV cache)
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None) -> list[list[int]]:
        """Left-padded batch decode. temperature 0 is greedy. Returns the new tokens of each prompt."""
        device = self.lm_head.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(B, P, dtype=torch.long, device=device)
        valid = torch.zeros(B, P, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = torch.tensor(p, device=device)
            valid[i, P - len(p):] = True
        cache = KVCache.empty(self.args, B, P + max_new_tokens, device, self.lm_head.weight.dtype)
        out = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        step_ids, step_valid = ids, valid
        for _ in range(max_new_tokens):
            logits = self._decode_step(step_ids, step_valid, cache)[:, -1].float()
            if temperature > 0:
                nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)[:, 0]
            else:
                nxt = logits.argmax(-1)
            for i in range(B):
                if not done[i]:
                    out[i].append(int(nxt[i]))
            if eos_token_id is not None:
                done |= nxt == eos_token_id
            if done.all():
                break
            step_ids, step_valid = nxt[:, None], torch.ones(B, 1, dtype=torch.bool, device=device)
        return out

    def _decode_step(self, ids: torch.Tensor, valid: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B, S = ids.shape
        start = cache.length
        cache.valid[:, start:start + S] = valid
        positions = cache.valid[:, :start + S].long().cumsum(-1)[:, start:] - 1
        causal = torch.ones(S, start + S, dtype=torch.bool, device=ids.device).tril(start)
        mask = causal[None] & cache.valid[:, None, :start + S]
        mask = mask | ~valid[:, :, None]  # padding queries attend anywhere; their outputs are unused
        h = self.model.embed_tokens(ids)
        cos, sin = self.rope(positions.clamp(min=0), h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, mask, ids, cache=cache, layer=i)
        cache.length += S
        return self.lm_head(self.model.norm(h))


def hash_table(args: ModelArgs, gen: torch.Generator | None) -> torch.Tensor:
    """A fixed random token-id -> K distinct experts table (Roller et al.'s hash layers)."""
    scores = torch.rand(args.vocab_size, args.n_routed_experts, generator=gen)
    return scores.topk(args.num_experts_per_tok, dim=-1)[1]


def mtp_horizon_weights(args: ModelArgs, step: int) -> list[float]:
    """Staggered MTP schedule: horizon k's loss weight ramps 0 -> 1 over `mtp_horizon_warmup` steps,
    starting once horizon k-1 is fully admitted. The first horizon is always on."""
    warm = args.mtp_horizon_warmup
    if not warm:
        return [1.0] * args.num_nextn_predict_layers
    return [1.0 if k == 0 else min(max((step - (k - 1) * warm) / warm, 0.0), 1.0)
            for k in range(args.num_nextn_predict_layers)]
