"""Rollout and weight-sync benchmarks, side by side in one run.

1. Rollout throughput through our pool (a Ray actor owning a vLLM engine) vs raw vLLM `LLM.generate` on the
   same checkpoint, prompts and sampling (target: pool overhead <= 5%).
2. Weight-sync bandwidth: our bucketed object-store sync into a running engine (publish + load, routed
   experts packed) vs a plain memory copy of the same bytes (target >= 50%) and vs saving a checkpoint and
   reloading it from disk into the same engine (target >= 10x faster).

    python benchmarks/rollout_sync.py [--checkpoint DIR]    # default: a random tiny-math model
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    import ray
    import torch

    from dspost.model import DeepseekV3, from_pretrained, hf_tensors, tiny_math
    from dspost.rollout.engine import SamplingConfig, VLLMEngine
    from dspost.rollout.pool import RolloutPool, WorkerSpec
    from dspost.rollout.sync import ObjectStoreTransport

    tmp = tempfile.mkdtemp()
    path = a.checkpoint or os.path.join(tmp, "ckpt")
    if a.checkpoint is None:
        DeepseekV3(tiny_math()).init_weights(0).save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (int(torch.randint(8, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(a.prompts)]
    sampling = SamplingConfig(n=a.n, temperature=1.0, max_tokens=a.max_tokens)
    kw = {"memory_fraction": 0.2, "max_model_len": 256}

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pool = RolloutPool(1, path, WorkerSpec(num_cpus=1, threads=2), kw)
    raw = VLLMEngine(path, **kw)

    def tokens(samples):
        return sum(len(s.response_ids) for s in samples)

    # 1. rollout: alternate raw and pool so drift hits both alike
    rates = {"raw vLLM LLM.generate": [], "dspost rollout pool": []}
    for r in range(a.repeats + 1):
        t = time.perf_counter()
        n_raw = tokens(raw.generate(prompts, sampling, 0, seed=r))
        raw_s = time.perf_counter() - t
        t = time.perf_counter()
        n_pool = tokens(pool.generate(prompts, sampling, seed=r))
        pool_s = time.perf_counter() - t
        if r:
            rates["raw vLLM LLM.generate"].append(n_raw / raw_s)
            rates["dspost rollout pool"].append(n_pool / pool_s)
    print(f"rollout: {a.prompts} prompts x n={a.n}, up to {a.max_tokens} new tokens, fp32, median of {a.repeats}")
    base = statistics.median(rates["raw vLLM LLM.generate"])
    for k, v in rates.items():
        print(f"  {k:<24} {statistics.median(v):8.0f} tokens/s  {statistics.median(v) / base:5.2f}x")

    # 2. weight sync
    model = from_pretrained(path)
    named = list(hf_tensors(model, include_mtp=False))
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    transport = ObjectStoreTransport(64 << 20)
    sync_s, copy_s, disk_s = [], [], []
    for r in range(a.repeats):
        t = time.perf_counter()
        refs = transport.publish(named)
        pool.sync(refs, version=r + 1)
        sync_s.append(time.perf_counter() - t)
        dst = [torch.empty_like(x) for _, x in named]
        t = time.perf_counter()
        for d, (_, x) in zip(dst, named):
            d.copy_(x)
        copy_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        model.save_pretrained(os.path.join(tmp, "reload"))
        raw.llm.collective_rpc("reload_weights", kwargs={"weights_path": os.path.join(tmp, "reload")})
        disk_s.append(time.perf_counter() - t)
    gb = nbytes / 1e9
    s, c, d = statistics.median(sync_s), statistics.median(copy_s), statistics.median(disk_s)
    print(f"weight sync: {nbytes / 2**20:.1f} MiB of weights, median of {a.repeats}")
    print(f"  dspost bucketed sync (publish+load) {s:7.3f} s  {gb / s:6.2f} GB/s")
    print(f"  plain memory copy                   {c:7.3f} s  {gb / c:6.2f} GB/s  -> sync at {c / s:.0%} of copy")
    print(f"  save checkpoint + reload from disk  {d:7.3f} s  {gb / d:6.2f} GB/s  -> sync {d / s:.1f}x faster")
    pool.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
