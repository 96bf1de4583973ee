"""Teacher scoring for on-policy distillation, side by side in one run: the teacher pool (`dspost/teacher.py`, a Ray
actor per teacher, results back as numpy arrays) against raw vLLM prompt-logprob calls (`LLM.generate` with
`prompt_logprobs`, the engine in this process, as `VLLMEngine.sequence_logprobs` makes it) on the same tokens.

Variants (one OPD step's worth of samples, default 16 prompts x 8 samples as the default GRPO step):
  - sampled: each sampled token's logprob. Raw vLLM `prompt_logprobs=0`, read as `VLLMEngine.sequence_logprobs`
    does (a dict of Logprob objects per position) and as flat lists (`flat_logprobs=True`, its fastest form);
    the pool's `vllm` backend (the flat call, head scaled by 1/T) and its `torch` backend (a plain forward).
    Target: pool overhead <= 10% over raw vLLM (the "vs raw" columns compare with the flat call).
  - top-k (k=32): raw `prompt_logprobs=32` (flat); pool `vllm` and `torch`.
  - full rows: raw `prompt_logprobs=-1` (flat) against the pool's `torch` backend, on a quarter of the samples (the
    raw call is ~10x the others).
Raw vLLM scores at T=1 whatever the request says (prompt logprobs skip the sampler); the pool scores at the rollout
temperature (--temperature, 0.6). The run prints both gaps: raw vLLM vs the tempered teacher, and the pool's two
backends against each other. Rounds alternate the variants so the machine's drift hits all alike; the first round is
warm-up, then min and median wall seconds, and the median CPU seconds of the processes doing the work (this one, plus
the pool's actor for the pool's variants), which other load on a shared machine moves far less than wall time.

    python benchmarks/teacher_scoring.py [--samples 128] [--rounds 5] [--k 32] [--temperature 0.6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def batch(n: int, seed: int = 0):
    """n samples: prompts of 16-40 tokens, responses of 8-48 (the default GRPO's max_tokens), random ids."""
    import torch

    from dspost.rollout.engine import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, r = int(torch.randint(16, 41, (1,), generator=g)), int(torch.randint(8, 49, (1,), generator=g))
        out.append(Sample(i, torch.randint(6, 1024, (p,), generator=g).tolist(),
                          torch.randint(6, 1024, (r,), generator=g).tolist(), [], "length", 0))
    return out


def raw_call(engine, samples, k: int, flat: bool = True):
    """The raw prompt-logprob call: prefill prompt + response, one new token, logprobs of every position; `flat`:
    as plain lists (vLLM's fastest form) instead of a dict of Logprob objects per position."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False, flat_logprobs=flat)
    return engine.llm.generate([{"prompt_token_ids": s.prompt_ids + s.response_ids} for s in samples], params,
                               use_tqdm=False)


def raw_sampled(engine, samples):
    """`VLLMEngine.sequence_logprobs`' extraction, response positions only."""
    outs = raw_call(engine, samples, 0, flat=False)
    return [[o.prompt_logprobs[j][t].logprob for j, t in enumerate(s.response_ids, len(s.prompt_ids))]
            for s, o in zip(samples, outs)]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (all threads)."""
    import psutil

    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def actor_pid(pool) -> int:
    import ray

    return ray.get(pool.workers[0].__ray_call__.remote(lambda self: os.getpid()))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=None, help="default: a random tiny-math init with the project's tokenizer")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.6)
    a = p.parse_args()

    import numpy as np
    import ray

    from dspost.model import DeepseekV3, load_tokenizer, tiny_math
    from dspost.rollout.engine import VLLMEngine
    from dspost.starting_point import tiny_math_init
    from dspost.teacher import TeacherPool, TeacherSpec

    path = a.checkpoint
    if path is None:
        path = os.path.join(tempfile.mkdtemp(), "ckpt")
        DeepseekV3(tiny_math()).init_weights(0).save_pretrained(path, tokenizer=load_tokenizer(str(tiny_math_init())))
    engine = {"memory_fraction": 0.2, "max_model_len": 256, "kv_cache_gb": 1}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    t = time.perf_counter()
    raw = VLLMEngine(path, **engine)
    raw.llm.llm_engine.model_config.max_logprobs = -1  # prompt_logprobs above 20 (vLLM's default cap)
    raw_start = time.perf_counter() - t
    t = time.perf_counter()
    torch_pool = TeacherPool([TeacherSpec("torch", path, threads=2)], row_len=256)
    torch_start = time.perf_counter() - t
    t = time.perf_counter()
    vllm_pool = TeacherPool([TeacherSpec("vllm", path, threads=2, backend="vllm")], engine=engine)
    vllm_start = time.perf_counter() - t
    print(f"start: raw vLLM engine {raw_start:.1f} s, pool[torch] {torch_start:.1f} s, pool[vllm] {vllm_start:.1f} s "
          f"(engine + start check against the plain forward)", flush=True)

    S, T, k = batch(a.samples), a.temperature, a.k
    quarter = S[: max(1, len(S) // 4)]
    domains = ["d"] * len(S)
    variants = {
        "raw vLLM prompt_logprobs=0, dicts": lambda: raw_sampled(raw, S),
        "raw vLLM prompt_logprobs=0, flat": lambda: raw_call(raw, S, 0),
        "pool[vllm] sampled": lambda: vllm_pool.score(S, domains, T),
        "pool[torch] sampled": lambda: torch_pool.score(S, domains, T),
        f"raw vLLM prompt_logprobs={k}, flat": lambda: raw_call(raw, S, k),
        f"pool[vllm] top-{k}": lambda: vllm_pool.score(S, domains, T, k=k),
        f"pool[torch] top-{k}": lambda: torch_pool.score(S, domains, T, k=k),
        "raw vLLM prompt_logprobs=-1, flat (1/4)": lambda: raw_call(raw, quarter, -1),
        "pool[torch] full rows (1/4)": lambda: torch_pool.score(quarter, domains[: len(quarter)], T, full=True),
    }
    here = os.getpid()
    pids = {"torch": [here, actor_pid(torch_pool)], "vllm": [here, actor_pid(vllm_pool)], "raw": [here]}
    walls: dict[str, list[float]] = {name: [] for name in variants}
    cpus: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(a.rounds + 1):
        for name, call in variants.items():
            who = pids["raw" if name.startswith("raw") else "torch" if "torch" in name else "vllm"]
            c, t = cpu_seconds(who), time.perf_counter()
            call()
            if r:  # round 0 warms up
                walls[name].append(time.perf_counter() - t)
                cpus[name].append(cpu_seconds(who) - c)
    positions = sum(len(s.response_ids) for s in S)
    print(f"{len(S)} samples, {positions} scored positions (responses), "
          f"{sum(len(s.prompt_ids) + len(s.response_ids) for s in S)} tokens prefilled; T={T}; {a.rounds} rounds "
          f"after one warm-up; load average {os.getloadavg()[0]:.1f}")
    print(f"  {'variant':<40} {'wall min s':>10} {'wall med s':>10} {'vs raw':>7} {'CPU med s':>10} {'vs raw':>7} "
          f"{'CPU us/position':>16}")
    base = None
    for name, w in walls.items():
        c = cpus[name]
        if name.startswith("raw"):
            base = (min(w), statistics.median(c))
        n = positions if "(1/4)" not in name else sum(len(s.response_ids) for s in quarter)
        cpu = statistics.median(c)
        print(f"  {name:<40} {min(w):10.3f} {statistics.median(w):10.3f} {min(w) / base[0]:6.2f}x "
              f"{cpu:10.3f} {cpu / base[1]:6.2f}x {1e6 * cpu / n:16.1f}")

    # what each returns: raw vLLM ignores the temperature; the pool's backends agree with each other
    raw_lp = np.concatenate([np.array(x, dtype=np.float32) for x in raw_sampled(raw, S)])
    torch_scores, vllm_scores = torch_pool.score(S, domains, T, k=k), vllm_pool.score(S, domains, T, k=k)
    ours = np.concatenate([s.token_logprobs for s in torch_scores])
    theirs = np.concatenate([s.token_logprobs for s in vllm_scores])
    top_gap = max(float(np.abs(x.support_logprobs[:, :k] - y.support_logprobs[:, :k]).max())
                  for x, y in zip(torch_scores, vllm_scores))
    print(f"raw vLLM (asked for T={T}) vs the tempered teacher: max |diff| {np.abs(raw_lp - ours).max():.3f} nats, "
          f"mean {np.abs(raw_lp - ours).mean():.3f}")
    print(f"pool[vllm] vs pool[torch] at T={T}: sampled max |diff| {np.abs(theirs - ours).max():.1e}, "
          f"top-{k} {top_gap:.1e}")
    torch_pool.shutdown()
    vllm_pool.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
