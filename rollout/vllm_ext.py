"""Weight updates written into a running vLLM engine's own storage: methods mixed into vLLM's worker
(`worker_extension_cls`), reached with `llm.collective_rpc("dspost_update_weights", args=(named,))`.

vLLM's `reload_weights` moves every layer to meta tensors and back, re-runs the post-processing of every
layer it loads and recomputes MLA's absorbed matrices for every layer, on every call (46-51 ms of a 100 ms
sync on tiny-math). What a new value needs on vLLM 0.32's CPU backend is much less, so each (HF name,
tensor) pair goes to its place and only what it feeds is redone:

- norms, the router's `e_score_correction_bias`: the parameter; nothing to redo.
- `kv_b_proj`: the parameter (MLA reads it); that layer's MLA `W_UK_T` / `W_UV` are recomputed (in an
  unquantized engine they are views of this weight, so this only matters where they are copies).
- `embed_tokens`, `lm_head`: the parameter; that layer's oneDNN handle is rebuilt.
- the other projections (`q_a_proj` + `kv_a_proj_with_mqa` fused into `fused_qkv_a_proj`, `gate_proj` +
  `up_proj` into `gate_up_proj`): only a oneDNN handle (the parameter is emptied); that layer's handle is
  rebuilt from the new values by vLLM's own `process_weights_after_loading`.
- routed experts `mlp.experts.{e}.*`: stacked [E, 2P, H] (gate rows, then up rows) and [E, H, P], P the
  width zero-padded for the kernel, prepacked; each expert sent is packed into its slot with vLLM's
  `prepack_moe_weight` (packing is per expert).

A projection that lives only in a oneDNN handle keeps no unpacked copy, so the two halves of a fused pair,
and an expert's gate_proj and up_proj, must arrive together (an error says so otherwise). Tensors in other
formats (a quantised engine; a GPU engine's experts) and other architectures (a transformers policy: Llama's
q/k/v fuse into `qkv_proj`) go through `reload_weights`, which handles any format and any model vLLM serves.
This leans on vLLM 0.32 internals: the version is pinned and `tests/rollout/test_weight_sync.py` checks
bit-identical logprobs against a freshly started engine.
"""

from __future__ import annotations

import re

import torch

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# checkpoint projection -> (vLLM's fused module, shard): the model's `stacked_params_mapping` in load_weights
_FUSED = {"q_a_proj": ("fused_qkv_a_proj", 0), "kv_a_proj_with_mqa": ("fused_qkv_a_proj", 1),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def fused_group(proj: str) -> list[str]:
    """The checkpoint projections the engine fuses with `proj` into one parameter, in shard order (`proj`
    alone when it is not fused): a partial update must send them together."""
    if proj not in _FUSED:
        return [proj]
    fused = _FUSED[proj][0]
    return sorted((p for p, (f, _) in _FUSED.items() if f == fused), key=lambda p: _FUSED[p][1])


class WeightSyncExtension:
    @torch.no_grad()
    def dspost_update_weights(self, named: list[tuple[str, torch.Tensor]]) -> int:
        """Write any subset of the checkpoint's tensors; returns how many were applied."""
        config = self.model_runner.model_config
        # Scales and all, or another architecture's fused names (a transformers policy): vLLM's general path.
        if config.quantization is not None or config.hf_config.model_type != "deepseek_v3":
            self.model_runner.reload_weights(weights_iterator=iter(named))
            return len(named)
        model = self.model_runner.get_model()
        params: list[tuple[str, torch.nn.Parameter, torch.Tensor]] = []
        linears: dict[str, dict[int | None, torch.Tensor]] = {}  # module -> {shard (None: unfused): tensor}
        experts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
        fallback: list[tuple[str, torch.Tensor]] = []
        for name, t in named:
            m = _EXPERT.match(name)
            if m:
                if self._dspost_packed_experts(m[1]) is None:
                    fallback.append((name, t))
                else:
                    experts.setdefault(m[1], {})[(int(m[2]), m[3])] = t
                continue
            path, shard, leaf = _target(model, name)
            module = _submodule(model, path, name)
            kind = _processed_kind(module)
            if leaf == "weight" and kind == "unquantized":
                linears.setdefault(path, {})[shard] = t
            elif kind == "other":
                fallback.append((name, t))
            else:
                params.append((name, module.get_parameter(leaf), t))
        for name, param, t in params:
            _check_shape(name, t, param.shape)
            param.data.copy_(t)
        for path, shards in linears.items():
            _write_linear(model.get_submodule(path), path, shards)
            mla = self._dspost_mla().get(path)
            if mla is not None:  # kv_b_proj: the absorbed matrices follow it (a no-op where they are views)
                mla.process_weights_after_loading(self.model_runner.model_config.dtype)
        for prefix, parts in experts.items():
            self._dspost_write_experts(prefix, parts)
        if fallback:
            self.model_runner.reload_weights(weights_iterator=iter(fallback))
        return len(named)

    # ---- lookups, cached per worker
    def _dspost_mla(self) -> dict:
        """kv_b_proj's module path -> the MLA attention layer that absorbs it."""
        if "_dspost_mla_cache" not in self.__dict__:
            from vllm.model_executor.layers.attention.mla_attention import MLAAttention

            model = self.model_runner.get_model()
            paths = {id(m): n for n, m in model.named_modules()}
            self._dspost_mla_cache = {paths[id(m.kv_b_proj)]: m for m in model.modules()
                                      if isinstance(m, MLAAttention) and id(m.kv_b_proj) in paths}
        return self._dspost_mla_cache

    def _dspost_packed_experts(self, prefix: str):
        """(module, isa) holding this layer's prepacked expert weights, or None when the engine's experts
        take checkpoint tensors through `reload_weights` as they are (GPU backends, zentorch)."""
        cache = self.__dict__.setdefault("_dspost_module_cache", {})
        if prefix not in cache:
            found = None
            if self.model_runner.device.type == "cpu":
                root = self.model_runner.get_model().get_submodule(prefix)
                mods = [m for m in root.modules() if hasattr(m, "w13_weight")]
                if mods:
                    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

                    kernel = getattr(mods[0].quant_method, "moe_kernel", None)
                    experts = getattr(kernel, "fused_experts", None)
                    if isinstance(experts, CPUUnquantizedExperts) and not getattr(experts, "_use_zentorch", False):
                        found = (mods[0], experts.isa)
            cache[prefix] = found
        return cache[prefix]

    def _dspost_write_experts(self, prefix: str, parts: dict[tuple[int, str], torch.Tensor]) -> None:
        """The experts sent, written into their slots of the stacked, padded, prepacked weights: each run of
        consecutive experts is packed with one call (a kernel call costs ~2 ms here whatever its size: 2
        loaded cores), straight from the sent tensors when they already lie as the stack, else through a
        staging buffer (kept between updates, its padding zero)."""
        module, isa = self._dspost_packed_experts(prefix)
        w13, w2 = module.w13_weight, module.w2_weight
        E, two_p, H = w13.shape
        P, inter = two_p // 2, module.intermediate_size_per_partition
        for e, leaf in parts:
            if not 0 <= e < E:
                raise ValueError(f"weight update: {prefix}.{e}.{leaf}: the engine has {E} experts in this layer")
            if leaf != "down_proj" and (e, "gate_proj" if leaf == "up_proj" else "up_proj") not in parts:
                raise ValueError(f"weight update: {prefix}.{e}: gate_proj and up_proj must be sent together (the "
                                 "engine packs them as one matrix and keeps no unpacked copy)")
        for a, b in _runs(sorted({e for e, leaf in parts if leaf == "gate_proj"})):
            run = [parts[(e, leaf)] for e in range(a, b) for leaf in ("gate_proj", "up_proj")]
            for i, t in enumerate(run):
                _check_shape(f"{prefix}.{a + i // 2}.{('gate_proj', 'up_proj')[i % 2]}.weight", t, (inter, H))
            src = _back_to_back(run, (b - a, two_p, H), w13.dtype) if inter == P else None
            if src is None:  # padded, or not laid out as the stack: through the staging buffer
                stage13 = self._dspost_staging(w13)
                for i, t in enumerate(run):
                    stage13[i // 2, (i % 2) * P:(i % 2) * P + inter] = t
                src = stage13[:b - a]
            torch.ops._C.prepack_moe_weight(src, w13.data[a:b], isa)
        for a, b in _runs(sorted({e for e, leaf in parts if leaf == "down_proj"})):
            run = [parts[(e, "down_proj")] for e in range(a, b)]
            for e, t in zip(range(a, b), run):
                _check_shape(f"{prefix}.{e}.down_proj.weight", t, (H, inter))
            src = _back_to_back(run, (b - a, H, P), w2.dtype) if inter == P else None
            if src is None:
                stage2 = self._dspost_staging(w2)
                for i, t in enumerate(run):
                    stage2[i, :, :inter] = t
                src = stage2[:b - a]
            torch.ops._C.prepack_moe_weight(src, w2.data[a:b], isa)

    def _dspost_staging(self, w: torch.Tensor) -> torch.Tensor:
        """A zeroed buffer shaped like `w`, one per shape, kept: fresh pages cost 4-8x a copy here."""
        cache = self.__dict__.setdefault("_dspost_stage_cache", {})
        key = (tuple(w.shape), w.dtype)
        if key not in cache:
            cache[key] = w.new_zeros(w.shape)
        return cache[key]


def _back_to_back(ts: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """One view of `shape` over tensors that lie back to back in one storage (as the transport's shared
    file lays out the checkpoint's order: an expert's gate_proj, its up_proj, the next expert's...), which
    saves the stacking copy; None when they do not."""
    first = ts[0]
    end = first.data_ptr()
    for t in ts:
        if t.dtype != dtype or not t.is_contiguous() or t.data_ptr() != end or \
                t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return None
        end += t.numel() * t.element_size()
    return first.as_strided(shape, torch.empty(shape, device="meta").stride(), first.storage_offset())


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs [a, b) of sorted ids."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _target(model: torch.nn.Module, name: str) -> tuple[str, int | None, str]:
    """(engine module path, shard of a fused module or None, parameter) for a checkpoint name."""
    path, _, leaf = name.rpartition(".")
    prefix, _, proj = path.rpartition(".")
    if proj in _FUSED and leaf == "weight":
        fused, shard = _FUSED[proj]
        try:
            model.get_submodule(f"{prefix}.{fused}")
            return f"{prefix}.{fused}", shard, leaf
        except AttributeError:  # this engine did not fuse it (e.g. q_lora_rank None)
            pass
    return path, None, leaf


def _submodule(model: torch.nn.Module, path: str, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"weight update: {name} has no place in the engine's model (no module {path})") from None


def _processed_kind(module: torch.nn.Module) -> str:
    """'unquantized' (weights post-processed by vLLM's unquantized linear or embedding method), 'other'
    (another quantisation method: left to reload_weights) or 'plain' (no post-processing)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    qm = getattr(module, "quant_method", None)
    if qm is None:
        return "plain"
    return "unquantized" if isinstance(qm, (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)) else "other"


def _check_shape(name: str, t: torch.Tensor, shape) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"weight update: {name} has shape {tuple(t.shape)}, the engine's is {tuple(shape)}")


def _write_linear(module: torch.nn.Module, path: str, shards: dict[int | None, torch.Tensor]) -> None:
    """New values for a linear/embedding weight, then the layer's own post-processing (its oneDNN handle)."""
    kept = module.weight
    sizes = getattr(module, "output_sizes", None) if None not in shards else None
    rows = [0, *torch.tensor(sizes).cumsum(0).tolist()] if sizes else None
    if kept.numel():  # the engine keeps the weight: write the rows sent
        for shard, t in shards.items():
            dst = kept.data if shard is None else kept.data[rows[shard]:rows[shard + 1]]
            _check_shape(f"{path} (shard {shard})" if shard is not None else f"{path}.weight", t, dst.shape)
            dst.copy_(t)
        module.quant_method.process_weights_after_loading(module)
        return
    # Packed away: the handle is rebuilt from the whole weight, which must arrive whole.
    if rows is not None:
        missing = [s for s in range(len(sizes)) if s not in shards]
        if missing:
            raise ValueError(f"weight update: {path} is fused from {len(sizes)} checkpoint tensors and the engine "
                             f"keeps no unpacked copy; shard(s) {missing} missing (send the fused tensors together)")
        parts = [shards[s] for s in range(len(sizes))]
        full = _back_to_back(parts, (sum(sizes), parts[0].shape[1]), kept.dtype) if parts[0].ndim == 2 else None
        full = torch.cat(parts) if full is None else full
    else:
        full = shards[None]
    _check_shape(f"{path}.weight", full, [getattr(module, f"{d}_size_per_partition", None) or getattr(module, f"{d}_size")
                                          for d in ("output", "input")])
    module.weight = torch.nn.Parameter(full.to(kept.dtype), requires_grad=False)
    try:
        module.quant_method.process_weights_after_loading(module)
        if module.weight.numel():
            raise RuntimeError(f"weight update: vLLM kept {path}'s weight this time instead of packing it away")
    finally:
        module.weight = kept  # the emptied parameter the engine registered (and its compiled graph saw)
