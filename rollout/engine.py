"""An in-process vLLM engine serving our checkpoint: token ids in, token ids and logprobs out."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class Sample:
    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    version: int
    routes: list | None = None  # per token, per MoE layer expert ids (only when the engine returns them)
    text: str = ""


@dataclass
class SamplingConfig:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    stop: list[str] = field(default_factory=list)


def cpu_attention(dtype: str) -> dict:
    """On a CPU with AMX, vLLM 0.32 picks its AMX MLA backend, whose weight packing takes bf16/fp16/int8 only: an
    fp32 engine dies at load ("expect weight to be bfloat16, ..."). fp32 engines ask for the reference CPU MLA
    backend, whose logprobs match the trainer's to ~1e-6 (compiled); a non-MLA model ignores the choice."""
    import torch

    if torch.cuda.is_available() or dtype != "float32":
        return {}
    return {"attention_config": {"backend": "CPU_MLA"}}


class VLLMEngine:
    """vLLM's `LLM` in this process (so weight updates reach it by reference), with the sync extension."""

    def __init__(self, path: str, dtype: str = "float32", memory_fraction: float = 0.3, max_model_len: int = 1024,
                 enforce_eager: bool = False, seed: int = 0, kv_cache_gb: float | None = None,
                 weight_transfer: str | None = None):
        # In-process engine core: weight updates pass tensors by reference (a separate engine process cannot
        # receive them through collective_rpc: "cannot pickle memoryview objects").
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # vLLM 0.32's AOT-compiled artifacts do not load under torch 2.13 ("'function' object has no attribute
        # 'finalize_loading'"), so by default every start recompiles: 22 s for a checkpoint path served before, 42 s
        # for a new one (the path is part of the cache key; every RL stage serves a new checkpoint). Without AOT
        # compilation, Dynamo traces again and Inductor's graph cache, keyed by the graph, serves any checkpoint of a
        # known architecture: 13 s, same logprobs (tiny-math, 2 cores, 2026-12-02; BENCHMARKS.md "Engine start").
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        if kv_cache_gb is not None:
            # CPU backend: a fixed KV-cache size instead of a fraction of the NUMA node's memory, whose
            # check counts every other engine in the process as used.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{kv_cache_gb:g}"
        from vllm import LLM

        from dspost.model import check_vllm_servable

        check_vllm_servable(path)
        # A checkpoint without tokenizer files is served token-ids-only (no text in the samples).
        self.detokenize = (Path(path) / "tokenizer_config.json").is_file()
        self.llm = LLM(model=path, dtype=dtype, gpu_memory_utilization=memory_fraction, max_model_len=max_model_len,
                       distributed_executor_backend="uni", enforce_eager=enforce_eager, seed=seed,
                       skip_tokenizer_init=not self.detokenize,
                       worker_extension_cls="dspost.rollout.vllm_ext.WeightSyncExtension",
                       # A sampled token's logprob under the distribution it was drawn from (after temperature
                       # and top-p), which the trainer's importance ratios compare against.
                       logprobs_mode="processed_logprobs",
                       **cpu_attention(dtype),
                       # GPU pools receive weights over NCCL through vLLM's weight-transfer engine.
                       **({"weight_transfer_config": {"backend": weight_transfer}} if weight_transfer else {}))
        # vLLM's CPU backend cannot return routed experts (needs Model Runner V2, which needs Triton).
        self.returns_routes = False

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, version: int, seed: int,
                 first_index: int = 0) -> list[Sample]:
        from vllm import SamplingParams

        params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_tokens, stop=sampling.stop or None, logprobs=0,
                                 seed=seed + i, detokenize=self.detokenize) for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        samples = []
        for i, (p, out) in enumerate(zip(prompts, outs)):
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [c.logprobs[t][tok].logprob for t, tok in enumerate(ids)] if c.logprobs else []
                samples.append(Sample(first_index + i, list(p), ids, lps, c.finish_reason or "length", version,
                                      text=c.text))
        return samples

    def sequence_logprobs(self, seqs: list[list[int]]) -> list[list[float]]:
        """Logprob of each token given its prefix (positions 1..n-1), from a prefill of the whole sequence."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)
        return [[lp[tok].logprob for tok, lp in zip(s[1:], o.prompt_logprobs[1:])] for s, o in zip(seqs, outs)]

    def update_weights(self, named: list[tuple[str, torch.Tensor]]) -> int:
        """Write (HF name, tensor) pairs into the running engine (`vllm_ext.WeightSyncExtension`); any
        subset of the checkpoint's tensors. Returns how many tensors were applied."""
        return self.llm.collective_rpc("dspost_update_weights", args=(named,))[0]
