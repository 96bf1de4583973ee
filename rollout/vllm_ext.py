"""Methods mixed into vLLM's worker (`worker_extension_cls`), reached with `llm.collective_rpc`.

Weight updates follow vLLM's own begin/update/finish shape. Everything but the routed experts goes through
vLLM's `reload_weights` (checkpoint-format names, vLLM fuses and repacks them itself). The routed experts
cannot: vLLM's CPU fused-MoE keeps them stacked ([E, 2P, H] gate rows then up rows, [E, H, P]), zero-padded
to P (the expert width rounded up for its kernel) and prepacked, and `reload_weights` writes the checkpoint
layout into the packed buffers (measured: unchanged weights in moved greedy logprobs by up to 0.22). So
experts are stashed, stacked per layer in the engine's layout, and packed with vLLM's own
`prepack_moe_weight` into the existing parameters. This leans on vLLM 0.32 internals: the version is
pinned and `tests/rollout/test_weight_sync.py` checks bit-identical logprobs.
"""

from __future__ import annotations

import re

import torch

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class WeightSyncExtension:
    def dspost_begin_update(self) -> None:
        self._dspost_regular: list[tuple[str, torch.Tensor]] = []
        self._dspost_experts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}

    def dspost_update(self, named: list[tuple[str, torch.Tensor]]) -> int:
        for name, t in named:
            m = _EXPERT.match(name)
            if m and self._dspost_packed_experts(m[1]) is not None:
                self._dspost_experts.setdefault(m[1], {})[(int(m[2]), m[3])] = t
            else:
                self._dspost_regular.append((name, t))
        return len(named)

    def dspost_finish_update(self) -> int:
        runner = self.model_runner
        if self._dspost_regular:
            runner.reload_weights(weights_iterator=iter(self._dspost_regular))
        for prefix, parts in self._dspost_experts.items():
            self._dspost_write_experts(prefix, parts)
        n = len(self._dspost_regular) + sum(len(p) for p in self._dspost_experts.values())
        self._dspost_regular, self._dspost_experts = [], {}
        return n

    # ---- routed experts in the CPU kernel's layout
    def _dspost_packed_experts(self, prefix: str):
        """The module holding this layer's prepacked expert weights, or None when the engine's experts
        take checkpoint tensors through `reload_weights` as they are (GPU backends, zentorch)."""
        cache = self.__dict__.setdefault("_dspost_module_cache", {})
        if prefix not in cache:
            found = None
            if self.model_runner.device.type == "cpu":
                root = self.model_runner.get_model().get_submodule(prefix)
                mods = [m for m in root.modules() if hasattr(m, "w13_weight")]
                if mods:
                    kernel = getattr(mods[0].quant_method, "moe_kernel", None)
                    experts = getattr(kernel, "fused_experts", None)
                    if experts is not None and hasattr(experts, "isa") and not getattr(experts, "_use_zentorch", False):
                        found = (mods[0], experts.isa)
            cache[prefix] = found
        return cache[prefix]

    def _dspost_write_experts(self, prefix: str, parts: dict[tuple[int, str], torch.Tensor]) -> None:
        module, isa = self._dspost_packed_experts(prefix)
        w13, w2 = module.w13_weight, module.w2_weight
        E, two_p, H = w13.shape
        P = two_p // 2
        missing = [(e, leaf) for e in range(E) for leaf in ("gate_proj", "up_proj", "down_proj") if (e, leaf) not in parts]
        if missing:
            raise ValueError(f"{prefix}: a weight update must carry every expert of a layer; missing {missing[:3]}")
        src13 = w13.new_zeros(E, 2 * P, H)
        src2 = w2.new_zeros(E, H, P)
        for e in range(E):
            gate, up, down = parts[(e, "gate_proj")], parts[(e, "up_proj")], parts[(e, "down_proj")]
            inter = gate.shape[0]
            src13[e, :inter] = gate
            src13[e, P:P + inter] = up
            src2[e, :, :inter] = down
        torch.ops._C.prepack_moe_weight(src13, w13.data, isa)
        torch.ops._C.prepack_moe_weight(src2, w2.data, isa)
