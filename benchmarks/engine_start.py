"""vLLM engine start, side by side in one run: vLLM 0.32's default AOT compilation against `VLLM_USE_AOT_COMPILE=0`
(what `VLLMEngine` sets), each engine in a fresh process as every Ray rollout worker is.

Under torch 2.13 vLLM's AOT artifacts fail to load ("'function' object has no attribute 'finalize_loading'"), so the
default recompiles at every start, and a checkpoint path it has not served before (the path is part of its cache
key; each RL stage serves a new checkpoint) compiles from nothing. Without AOT, Dynamo traces again and Inductor's
graph cache (keyed by the graph, not the path) serves any checkpoint of an architecture it has compiled.

For each setting: one start on the first checkpoint (warming that setting's caches), then one start per checkpoint,
each a path this setting has not served in this run (pass checkpoints no engine has served, e.g. fresh copies, for
the new-path case). Printed: seconds from `VLLMEngine(...)` to a served engine, and whether the probe's logprobs are
bit-identical across settings.

    python benchmarks/engine_start.py CKPT_A CKPT_B [CKPT_C ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PROBE = [4, 100, 101, 102, 5, 200, 201, 202, 2, 17, 18, 19]


def child(path: str) -> None:
    import time

    from dspost.rollout.engine import VLLMEngine

    t = time.perf_counter()
    engine = VLLMEngine(path, dtype="float32", max_model_len=304, kv_cache_gb=1)
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "logprobs": engine.sequence_logprobs([PROBE])[0]}))


def start(path: str, aot: str) -> dict:
    """One engine start in a fresh process with VLLM_USE_AOT_COMPILE=`aot` ("1" is vLLM's default under torch >= 2.10;
    `VLLMEngine` only sets "0" where the variable is unset)."""
    env = {**os.environ, "VLLM_USE_AOT_COMPILE": aot}
    out = subprocess.run([sys.executable, __file__, "--child", path], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="*")
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        child(args.child)
        return
    if len(args.checkpoints) < 2:
        p.error("pass at least two checkpoints of one architecture")
    first, *others = args.checkpoints
    results = {}
    for name, aot in (("vLLM default (AOT)", "1"), ("VLLM_USE_AOT_COMPILE=0", "0")):
        warm = start(first, aot)
        runs = [start(path, aot) for path in others]
        results[name] = (warm, runs)
        print(f"{name:24s} first path {warm['seconds']:5.1f} s; other paths "
              + ", ".join(f"{r['seconds']:.1f}" for r in runs) + " s", flush=True)
    (a_warm, _), (b_warm, _) = results.values()
    print("probe logprobs bit-identical across settings:", a_warm["logprobs"] == b_warm["logprobs"])


if __name__ == "__main__":
    main()
