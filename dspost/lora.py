"""LoRA through PEFT, for our DeepSeek model and any transformers causal LM.

Adapters are saved in PEFT format (`adapter_config.json` + `adapter_model.safetensors`). Our model's module
names are the Hugging Face ones, so an adapter trained on it loads with
`peft.PeftModel.from_pretrained(DeepseekV3ForCausalLM.from_pretrained(base), adapter)` as well as on ours.
MTP layers, which transformers does not load, are never adapted."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

NOT_ADAPTED = r".*mtp_layers.*"


def lora_config(cfg):
    from peft import LoraConfig

    if cfg.routed_experts:
        # Measured with peft 0.21: adapters on the stacked expert tensors (target_parameters) train and save,
        # but reloading them fails (PEFT's gate_up_proj rank pattern does not match on load).
        raise NotImplementedError("trainer.lora.routed_experts: LoRA on the stacked routed experts does not "
                                  "round-trip through PEFT's target_parameters yet; adapt the shared experts instead")
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                      exclude_modules=NOT_ADAPTED)


def add_adapters(model, cfg, base_path: str | Path):
    """Wrap `model` with fresh trainable adapters; everything else is frozen."""
    from peft import get_peft_model

    model.name_or_path = str(base_path)  # PEFT records it as the adapter's base_model_name_or_path
    return get_peft_model(model, lora_config(cfg))


def load_adapters(model, adapter_dir: str | Path, trainable: bool = True):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def is_adapted(model) -> bool:
    return hasattr(model, "peft_config")


@contextlib.contextmanager
def merged(model):
    """Adapters folded into the base weights for the duration (generation reads some weights directly,
    e.g. MLA's absorbed decode path, and skips the adapter otherwise)."""
    if not is_adapted(model):
        yield model
        return
    model.merge_adapter()
    try:
        yield model.get_base_model()
    finally:
        model.unmerge_adapter()


def load_base(path: str | Path, dtype=None):
    """Our model for a `deepseek_v3` checkpoint, else whatever transformers loads as a causal LM."""
    import torch

    config = json.loads((Path(path) / "config.json").read_text())
    if config.get("model_type") == "deepseek_v3":
        from dspost.model import from_pretrained

        return from_pretrained(path, dtype=dtype or torch.float32)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)


def merge_lora(adapter_dir: str | Path, out_dir: str | Path, base: str | Path | None = None) -> Path:
    """Fold a PEFT adapter into its base model and write a full checkpoint (atomically) to `out_dir`."""
    from dspost.model import load_tokenizer
    from dspost.model.checkpoint import atomic_dir, write_checkpoint

    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter directory)")
    base = Path(base or json.loads(config_file.read_text()).get("base_model_name_or_path") or "")
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base}: base model of {adapter_dir} not found (pass --base)")
    model = load_adapters(load_base(base), adapter_dir, trainable=False).merge_and_unload()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tokenizer_from = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
        tokenizer = load_tokenizer(str(tokenizer_from)) if (tokenizer_from / "tokenizer_config.json").is_file() else None
        if is_ours(model):
            write_checkpoint(model, tmp, tokenizer=tokenizer)
        else:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    return out_dir


def is_ours(model) -> bool:
    """Our DeepseekV3, bare or under PEFT adapters (vs a transformers model)."""
    from dspost.model import DeepseekV3

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(base, DeepseekV3)


def adapted_tensors(model) -> list:
    """What a weight sync of a LoRA policy sends the rollout engines, (HF name, tensor) pairs: W + scale * B @ A
    for every adapted module, computed aside (the trained weights and adapters are not touched), plus the unadapted
    partners the engine fuses with an adapted projection (`q_a_proj` + `kv_a_proj_with_mqa`, `gate_proj` +
    `up_proj`: vLLM packs the pair into one matrix and keeps no unpacked copy, so they travel together), each
    fused group back to back in shard order. The base is frozen, so an engine started from the base checkpoint
    and sent these serves the adapted policy exactly: the rest of its weights never change.

    Why merged tensors and not vLLM's own LoRA path: `DeepseekV3ForCausalLM` declares `SupportsLoRA`, but on
    vLLM 0.32's CPU backend (tiny-math, float32 and bfloat16, 2026-12-02) an `enable_lora=True` engine dies in
    its first forward: with LoRA on, the routed experts take the Triton MoE backend, which has no CPU build
    ("module 'triton.language' has no attribute 'float32'"). Where it does serve, vLLM runs LoRA engines
    uncompiled (`platforms/cpu.py` sets CompilationMode.NONE), whose logprobs drift from the trainer's by up to
    0.14 nats instead of ~1e-6 (see `sync.parity_threshold`), and each decode step pays the adapter matmuls.
    Merged tensors keep the compiled engine, its parity and its speed. With the default adapters (r=16 on the
    five MLA projections) a sync sends 6.0 MiB (20 tensors) of tiny-math's 19.7 MiB main stack; the MLA
    projections are 1.7% of DeepSeek-V3's 671B parameters. Sending A and B alone (0.7 MiB here) would need the
    engine to keep an unpacked copy of each base weight to merge into, which its oneDNN handles do not
    (BENCHMARKS.md, "LoRA GRPO")."""
    import torch
    from peft.tuners.lora import LoraLayer

    from dspost.rollout.vllm_ext import fused_group

    base = model.get_base_model()
    merged_weights: dict[str, torch.Tensor] = {}
    groups: list[str] = []  # module paths to send, fused partners adjacent
    with torch.no_grad():
        for path, m in base.named_modules():
            if not isinstance(m, LoraLayer):
                continue
            if m.merged:
                raise RuntimeError(f"{path}: the adapter is merged into the base weight; unmerge before a sync")
            w = m.get_base_layer().weight
            delta = sum(m.get_delta_weight(a) for a in m.active_adapters if a in m.scaling)
            merged_weights[path] = (w + delta).to(w.dtype)
            prefix, _, proj = path.rpartition(".")
            for partner in fused_group(proj):
                p = f"{prefix}.{partner}" if prefix else partner
                if p not in groups and _has_module(base, p):
                    groups.append(p)
    return [(f"{p}.weight", merged_weights[p] if p in merged_weights else base.get_submodule(p).weight.detach())
            for p in groups]


def _has_module(model, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False
