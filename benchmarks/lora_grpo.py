"""LoRA GRPO against full GRPO on the default recipe (`recipes/grpo_math.yaml`: GSPO on synthetic math from the
tiny-math warm start, 16 prompts x 8 completions, <= 48 new tokens, one vLLM rollout actor and one trainer actor
on Ray, 2 CPU cores), same checkpoint and seed; LoRA with the defaults of `trainer.lora: {}` (r=16 on the five MLA
projections). Runs alternate (full, LoRA, full, LoRA, ...) so the machine's drift hits both. Per step: time
(without the final step's eval and save), the update's and the sync's time, the bytes a sync sends, and the parity
probe; medians and minima over the steps after the warm-up ones.

    python benchmarks/lora_grpo.py [--checkpoint DIR] [--steps 5] [--warmup 1] [--rounds 2]

Without --checkpoint it uses the tiny-math warm start (`dspost.runner.start_from`, trained once if not cached).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

KEYS = {"step s": "step", "update s": "time/update", "sync s": "time/sync", "push s": "sync/push_seconds",
        "engine load s": "sync/load_seconds", "sync MB": "sync/bytes", "parity max": "sync/parity_max_abs"}


def run(checkpoint: str, steps: int, lora: bool) -> dict[str, list[float]]:
    out = Path(tempfile.mkdtemp()) / "run"
    cmd = [sys.executable, "-m", "dspost", "run", "recipes/grpo_math.yaml", f"model.path={checkpoint}",
           f"output_dir={out}", f"trainer.max_steps={steps}", f"trainer.eval_every={steps + 1}",
           f"trainer.save_every={steps + 1}", "data.num_eval=16", *(["trainer.lora={}"] if lora else [])]
    subprocess.run(cmd, check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] >= 1]
    for r in rows:  # the final step's eval and save have no counterpart in the others
        r["step"] = r["time/step"] - r.get("time/eval", 0) - r.get("time/save", 0)
        r["sync/bytes"] /= 2**20
    series = {name: [r[key] for r in rows] for name, key in KEYS.items()}
    series["save s"] = [rows[-1]["time/save"]]
    return series


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", help="a tiny-math checkpoint with tokenizer (default: the warm start)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    checkpoint = a.checkpoint
    if checkpoint is None:
        from dspost.config import ModelSection
        from dspost.runner import start_from

        checkpoint = str(start_from(ModelSection(), None))
    results: dict[str, dict[str, list[float]]] = {"full GRPO": {}, "LoRA GRPO": {}}
    for i in range(a.rounds):
        for name, lora in (("full GRPO", False), ("LoRA GRPO", True)):
            series = run(checkpoint, a.steps, lora)
            for k, v in series.items():
                results[name].setdefault(k, []).extend(v if k == "save s" else v[a.warmup:])
            print(f"round {i + 1} {name}: " + ", ".join(f"{k} {[round(x, 3) for x in v]}" for k, v in series.items()),
                  flush=True)
    print(f"{checkpoint}: {a.rounds} runs each, medians of steps {a.warmup + 1}..{a.steps} (save: the final step's)")
    names = list(KEYS) + ["save s"]
    print("| | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for name, series in results.items():
        # the minimum beside the median: on a machine shared with other jobs, contention only ever adds time
        for stat, f in (("median", statistics.median), ("min", min)):
            print(f"| {name}, {stat} | " + " | ".join(f"{f(series[k]):.3g}" for k in names) + " |")


if __name__ == "__main__":
    main()
