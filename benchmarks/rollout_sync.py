"""Rollout and weight-sync benchmarks, side by side in one run.

1. Rollout throughput through our pool (a Ray actor owning a vLLM engine) vs raw vLLM `LLM.generate` on the
   same checkpoint, prompts and sampling (target: pool overhead <= 5%). Skipped with --sync-only.
2. Weight sync into a rollout worker (a Ray actor owning a vLLM engine), end to end from the trainer-side
   tensors to an engine serving them:
   - new: `ObjectStoreTransport.push` with the model hosted (`connect(..., host=model)`: the parameters live in
     a shared-memory file that a same-node worker maps once and reads in place; it writes them into the
     engine's storage and redoes only the post-processing they feed);
   - the same without hosting: the sender copies the tensors into its shared file on every push;
   - old (775a309): tensors copied into flat buckets with adler32, put, verified, then vLLM's
     `reload_weights` for everything but the routed experts, which are stacked and packed per layer;
   - a plain memory copy of the same tensors, into fresh buffers (the target's yardstick) and into buffers
     already written once;
   - saving a checkpoint and reloading it from disk into the same engine (`reload_weights(weights_path)`).
   Targets at ~1 GB (--size 1gb): new >= 50% of the copy's bandwidth and >= 10x faster than save + reload.
   The runs alternate, the first (cold) round is reported apart, medians of the rest. Old and new must give
   bit-identical logprobs on a changed checkpoint (checked at the end).

    python benchmarks/rollout_sync.py [--size tiny|1gb] [--sync-only] [--repeats R] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import zlib

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from dspost.rollout.pool import RolloutWorker  # noqa: E402

SIZES = {  # tiny_math overrides; "1gb": 932 MiB of fp32 weights served (768 MiB routed experts)
    "tiny": {},
    "1gb": dict(hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512, num_hidden_layers=9,
                n_routed_experts=16, num_attention_heads=8, q_lora_rank=384, qk_nope_head_dim=64, v_head_dim=64),
}


# ------------------------------------------------------------------------- the old path (775a309), for comparison
def _old_buckets(named, bucket_bytes):
    """775a309's make_buckets: each bucket one flat uint8 array (a copy) with its adler32."""
    import numpy as np
    import torch

    pending, size = [], 0

    def flush():
        data = np.empty(sum(t.numel() * t.element_size() for _, t in pending), dtype=np.uint8)
        meta, off = [], 0
        for name, t in pending:
            n = t.numel() * t.element_size()
            data[off:off + n] = t.detach().contiguous().view(-1).view(torch.uint8).numpy()
            meta.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), off, n))
            off += n
        return meta, data, zlib.adler32(memoryview(data)) & 0xFFFFFFFF

    for name, t in named:
        n = t.numel() * t.element_size()
        if pending and size + n > bucket_bytes:
            yield flush()
            pending, size = [], 0
        pending.append((name, t))
        size += n
    if pending:
        yield flush()


def _old_engine_update(worker, named):
    """775a309's engine side: `reload_weights` for all but the routed experts; experts stacked per layer
    into fresh zeroed buffers and packed with `prepack_moe_weight`."""
    import re

    import torch

    expert = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    regular, experts = [], {}
    for name, t in named:
        m = expert.match(name)
        if m and worker._dspost_packed_experts(m[1]) is not None:
            experts.setdefault(m[1], {})[(int(m[2]), m[3])] = t
        else:
            regular.append((name, t))
    worker.model_runner.reload_weights(weights_iterator=iter(regular))
    for prefix, parts in experts.items():
        module, isa = worker._dspost_packed_experts(prefix)
        w13, w2 = module.w13_weight, module.w2_weight
        E, two_p, H = w13.shape
        P = two_p // 2
        src13, src2 = w13.new_zeros(E, 2 * P, H), w2.new_zeros(E, H, P)
        for e in range(E):
            gate, up, down = parts[(e, "gate_proj")], parts[(e, "up_proj")], parts[(e, "down_proj")]
            inter = gate.shape[0]
            src13[e, :inter], src13[e, P:P + inter], src2[e, :, :inter] = gate, up, down
        torch.ops._C.prepack_moe_weight(src13, w13.data, isa)
        torch.ops._C.prepack_moe_weight(src2, w2.data, isa)


class BenchWorker(RolloutWorker):
    """Our rollout worker plus the old load path, a reload from disk and a profiled load."""

    def load_old(self, refs: list, version: int) -> None:
        import ray
        import torch

        named = []
        for meta, data, checksum in ray.get(refs):
            if zlib.adler32(memoryview(data)) & 0xFFFFFFFF != checksum:
                raise RuntimeError("checksum")
            buf = torch.from_numpy(data)
            named += [(n, buf[off:off + k].view(getattr(torch, dt)).view(shape)) for n, dt, shape, off, k in meta]
        self.engine.llm.collective_rpc(_old_engine_update, args=(named,))
        self.version = version

    def reload_from_disk(self, path: str) -> None:
        self.engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})

    def profile_load(self, refs: list, version: int) -> str:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        self.load_weights(refs, version)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
        return out.getvalue()


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--sync-only", action="store_true")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket-mb", type=float, default=64)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()

    import ray
    import torch

    from dspost.model import DeepseekV3, from_pretrained, hf_tensors, tiny_math

    tmp = tempfile.mkdtemp()
    path = a.checkpoint or os.path.join(tmp, "ckpt")
    if a.checkpoint is None:
        DeepseekV3(tiny_math(**SIZES[a.size])).init_weights(0).save_pretrained(path)
    kw = {"memory_fraction": 0.2, "max_model_len": 256, "kv_cache_gb": 1}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    if not a.sync_only:
        rollout(a, path, kw)

    from dspost.rollout.sync import ObjectStoreTransport, shared_weights

    worker = ray.remote(BenchWorker).options(num_cpus=1, runtime_env={"env_vars": {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "2"}}).remote(path, kw, 2)
    ray.get(worker.get_version.remote())
    model = from_pretrained(path)
    bucket = int(a.bucket_mb * 2**20)
    staging = ObjectStoreTransport(bucket)  # copies the tensors into its shared file on every push
    staging.connect([worker])
    transport = ObjectStoreTransport(bucket)  # hosts the model's parameters: pushes read them in place
    transport.connect([worker], host=model)
    named = list(hf_tensors(model, include_mtp=False))  # views of the hosted parameters
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    warm_dst = [torch.empty_like(x) for _, x in named]

    loads: list[float] = []

    def run_new(v):
        stats = transport.push(named, v)
        assert stats.staged_bytes == 0, f"{stats.staged_bytes} bytes staged from hosted parameters"
        loads.append(stats.load_seconds)

    def run_staged(v):
        assert staging.push(named, v).staged_bytes == nbytes

    def run_old(v):
        refs = [ray.put(b) for b in _old_buckets(named, bucket)]
        ray.get(worker.load_old.remote(refs, v))

    def run_copy_fresh(v):
        dst = [torch.empty_like(x) for _, x in named]
        for d, (_, x) in zip(dst, named):
            d.copy_(x)

    def run_copy_warm(v):
        for d, (_, x) in zip(warm_dst, named):
            d.copy_(x)

    def run_disk(v):
        model.save_pretrained(os.path.join(tmp, "reload"))
        ray.get(worker.reload_from_disk.remote(os.path.join(tmp, "reload")))

    runs = {"new: ObjectStoreTransport.push": run_new, "new, sender copies (parameters not hosted)": run_staged,
            "old (775a309): buckets + reload_weights": run_old,
            "plain memory copy (fresh buffers)": run_copy_fresh, "plain memory copy (written before)": run_copy_warm,
            "save checkpoint + reload from disk": run_disk}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(a.repeats + 1):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn(r + 1)
            times[k].append(time.perf_counter() - t)
    gb = nbytes / 1e9
    print(f"weight sync: {nbytes / 2**20:.0f} MiB of weights ({a.size}), {a.bucket_mb:g} MiB buckets, "
          f"first (cold) round, then median of {a.repeats}")
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    new = med["new: ObjectStoreTransport.push"]
    for k, v in times.items():
        print(f"  {k:<42} cold {v[0]:7.3f} s   {med[k]:7.3f} s  {gb / med[k]:6.2f} GB/s  "
              f"new is {med[k] / new:5.2f}x faster")
    print(f"  new at {med['plain memory copy (fresh buffers)'] / new:.0%} of the fresh-buffer copy's bandwidth and "
          f"{med['plain memory copy (written before)'] / new:.0%} of the warm one's; of its {new:.3f} s the worker "
          f"spent {statistics.median(loads[1:]):.3f} s writing into the engine")

    # Bit-exactness: old and new paths give the same logprobs on a changed checkpoint, and the new one
    # gives back the original logprobs after restoring.
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, model.args.vocab_size, (n,), generator=g).tolist() for n in (12, 30, 47)]
    run_new(99)  # the disk path left the routed experts in the checkpoint layout (wrong on CPU)
    before = ray.get(worker.sequence_logprobs.remote(seqs))
    with torch.no_grad():
        for _, t in named:
            t.add_(torch.randn(t.shape, generator=g) * 0.02)
    run_old(100)
    old_lp = ray.get(worker.sequence_logprobs.remote(seqs))
    run_new(101)
    new_lp = ray.get(worker.sequence_logprobs.remote(seqs))
    with torch.no_grad():
        for (_, t), (_, orig) in zip(named, hf_tensors(from_pretrained(path), include_mtp=False)):
            t.copy_(orig)
    run_new(102)
    print(f"  new == old on a changed checkpoint: {new_lp == old_lp}; restored == original: "
          f"{ray.get(worker.sequence_logprobs.remote(seqs)) == before}")

    if a.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        t = time.perf_counter()
        shared_weights(named, staging.hosted, staging.segment)
        write_s = time.perf_counter() - t
        prof.disable()
        print(f"sender without hosting (SharedSegment.write, {write_s:.3f} s; hosted: nothing to write):")
        pstats.Stats(prof).sort_stats("tottime").print_stats(6)
        print("rollout worker (load_weights from the hosted parameters):")
        print(ray.get(worker.profile_load.remote(shared_weights(named, transport.hosted, transport.segment)[0], 200)))
    ray.shutdown()


def rollout(a, path: str, kw: dict) -> None:
    import torch

    from dspost.rollout.engine import SamplingConfig, VLLMEngine
    from dspost.rollout.pool import RolloutPool, WorkerSpec

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (int(torch.randint(8, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(a.prompts)]
    sampling = SamplingConfig(n=a.n, temperature=1.0, max_tokens=a.max_tokens)
    pool = RolloutPool(1, path, WorkerSpec(num_cpus=1, threads=2), kw)
    raw = VLLMEngine(path, **kw)

    def tokens(samples):
        return sum(len(s.response_ids) for s in samples)

    rates = {"raw vLLM LLM.generate": [], "dspost rollout pool": []}
    for r in range(a.repeats + 1):  # alternate raw and pool so drift hits both alike
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
    pool.shutdown()
    del raw


if __name__ == "__main__":
    main()
