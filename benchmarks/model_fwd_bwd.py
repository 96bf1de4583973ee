"""Forward+backward tokens/s and peak memory: dspost's DeepSeek-V3 vs transformers' DeepseekV3ForCausalLM.

Same config and weights (one checkpoint, loaded by each), fp32. Throughput is timed in one process with the
two models' steps interleaved, so machine drift (large on 2 shared cores) hits both alike; peak memory is
each model's own, measured in a separate subprocess. Also reports each as a fraction of this machine's
measured fp32 matmul rate.

    python benchmarks/model_fwd_bwd.py                # both configs, batch 8 x 256
    python benchmarks/model_fwd_bwd.py --config moe64 --steps 5
    python benchmarks/model_fwd_bwd.py --compile     # also both compiled (ours: apply_compile; HF: model.compile())
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch

CONFIGS = {
    # tiny-math's size: 8 experts, top-2
    "tiny-math": {},
    # many small expert groups: 64 routed experts, top-6
    "moe64": {"n_routed_experts": 64, "num_experts_per_tok": 6, "n_group": 8, "topk_group": 4,
              "moe_intermediate_size": 64},
}


def matmul_rate(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def train_flops_per_token(args, seq: int) -> float:
    """Matmul FLOPs of one token's forward+backward (6 x active weights + attention scores)."""
    H, dn, dr, dv, C, D = (args.num_attention_heads, args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim,
                           args.kv_lora_rank, args.hidden_size)
    q = D * args.q_lora_rank + args.q_lora_rank * H * (dn + dr) if args.q_lora_rank else D * H * (dn + dr)
    attn = q + D * (C + dr) + C * H * (dn + dv) + H * dv * D
    dense = 3 * D * args.intermediate_size
    moe = 3 * D * args.moe_intermediate_size * (args.num_experts_per_tok + args.n_shared_experts) + D * args.n_routed_experts
    n_moe = args.num_hidden_layers - args.first_k_dense_replace
    weights = args.num_hidden_layers * attn + args.first_k_dense_replace * dense + n_moe * moe + D * args.vocab_size
    scores = args.num_hidden_layers * 2 * seq * H * (dn + dr + dv)  # QK^T and PV, full (non-causal) count
    return 6 * weights + 3 * scores


def load(variant: str, path: str):
    """`variant`: "dspost" or "transformers", with "+compile" for the compiled model."""
    impl, compile = variant.removesuffix("+compile"), variant.endswith("+compile")
    if impl == "dspost":
        from dspost.model import apply_compile, from_pretrained

        model = from_pretrained(path).train()
        model.model.mtp_layers = torch.nn.ModuleList()  # MTP off: transformers has none
        if compile:
            apply_compile(model)
        return model, lambda ids: model(ids, labels=ids).lm_loss
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    if compile:
        model.compile()
    return model, lambda ids: model(input_ids=ids, labels=ids).loss


def peak_memory(impl: str, path: str, batch: int, seq: int) -> float:
    """Peak RSS (GiB) of a process that loads one model and runs two training steps."""
    model, run = load(impl, path)
    ids = torch.randint(0, 1024, (batch, seq))
    for _ in range(2):
        run(ids).backward()
    # VmHWM is this address space's peak; ru_maxrss would carry the parent's peak across execve.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def throughput(path: str, batch: int, seq: int, steps: int, impls: list[str]) -> dict[str, float]:
    runs = {impl: load(impl, path)[1] for impl in impls}
    ids = torch.randint(0, 1024, (batch, seq))
    times = {impl: [] for impl in runs}
    for i in range(steps + 2):
        for impl, run in runs.items():
            t = time.perf_counter()
            run(ids).backward()
            if i > 1:  # the first two rounds are warm-up (compilation)
                times[impl].append(time.perf_counter() - t)
    return {impl: batch * seq / statistics.median(ts) for impl, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (median reported)")
    p.add_argument("--compile", action="store_true", help="also time both models compiled")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "PATH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(peak_memory(a.child[0], a.child[1], a.batch, a.seq)))
        return
    from dspost.model import DeepseekV3, tiny_math

    rate = statistics.median(matmul_rate() for _ in range(3))
    print(f"fp32 matmul rate (2048^3): {rate / 1e9:.1f} GFLOP/s, {torch.get_num_threads()} threads")
    print(f"{'config':<10} {'impl':<21} {'tokens/s':>9} {'vs HF':>6} {'vs HF eager':>11} {'of matmul':>9} {'peak RSS':>9}")
    for name in CONFIGS if a.config == "all" else [a.config]:
        args = tiny_math(**CONFIGS[name])
        with tempfile.TemporaryDirectory() as d:
            DeepseekV3(args).init_weights(0).save_pretrained(d)
            impls = ["transformers", "dspost"] + ["transformers+compile", "dspost+compile"] * a.compile
            tps = throughput(d, a.batch, a.seq, a.steps, impls)
            mem = {}
            for impl in tps:
                out = subprocess.run([sys.executable, __file__, "--child", impl, d, "--batch", str(a.batch),
                                      "--seq", str(a.seq)], capture_output=True, text=True, check=True)
                mem[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            res = {impl: {"tokens_per_s": tps[impl], "peak_rss_gib": mem[impl]} for impl in tps}
        flops = train_flops_per_token(args, a.seq)
        for impl, r in res.items():
            same_mode = "transformers+compile" if impl.endswith("+compile") else "transformers"
            ratio = r["tokens_per_s"] / res[same_mode]["tokens_per_s"]
            vs_eager = r["tokens_per_s"] / res["transformers"]["tokens_per_s"]
            print(f"{name:<10} {impl:<21} {r['tokens_per_s']:>9.0f} {ratio:>5.2f}x {vs_eager:>10.2f}x {r['tokens_per_s'] * flops / rate:>8.0%}"
                  f" {r['peak_rss_gib']:>7.2f}GiB")


if __name__ == "__main__":
    main()
