"""GRPO step time: dspost (vLLM rollout actor + trainer actor on Ray) vs TRL's GRPOTrainer, same model
(a tiny-math checkpoint), same prompts (synthetic math), same batch (16 prompts x 8 completions, up to 48
new tokens), same reward (our math verifier), sequence-level importance ratio (GSPO) in both, fp32, CPU.

TRL generates with transformers (`use_vllm=False`): its colocated vLLM path fails on this model (fused
expert names; see ../shared/notes/verified-here.md). Median step time over the timed steps; the first
steps of each are warm-up.

    python benchmarks/grpo_vs_trl.py --checkpoint DIR [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS, N, MAX_TOKENS = 16, 8, 48


def ours(checkpoint: str, steps: int, *overrides: str) -> list[float]:
    out = Path(tempfile.mkdtemp()) / "run"
    cmd = [sys.executable, "-m", "dspost", "run", "recipes/grpo_math.yaml", f"model.path={checkpoint}",
           f"output_dir={out}", f"trainer.max_steps={steps}", f"trainer.eval_every={steps + 1}",
           f"trainer.save_every={steps + 1}", f"rollout.prompts_per_step={PROMPTS}", f"rollout.n={N}",
           f"rollout.max_tokens={MAX_TOKENS}", *overrides]
    subprocess.run(cmd, check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # time/step minus the final step's eval and save, which TRL's timing has no counterpart for
    return [r["time/step"] - r.get("time/eval", 0) - r.get("time/save", 0) for r in rows if r["step"] >= 1]


def trl(checkpoint: str, steps: int) -> list[float]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dspost.data import synthetic_math
    from dspost.rewards import verify_math

    torch.set_num_threads(2)
    train, _ = synthetic_math.splits(2000, 200, 0, [1, 2])
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p.question}], "answer": p.answer} for p in train])

    def math_reward(prompts, completions, answer, **kw):
        return [verify_math(c[0]["content"] if isinstance(c, list) else c, a).score for c, a in zip(completions, answer)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=PROMPTS * N, num_generations=N,
                     max_completion_length=MAX_TOKENS, max_steps=steps, learning_rate=2e-5, temperature=1.0,
                     beta=0.0, importance_sampling_level="sequence", use_cpu=True, bf16=False, report_to=[],
                     logging_steps=1, save_strategy="no", use_vllm=False)
    model = DeepseekV3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=[math_reward], args=cfg, train_dataset=ds,
                          processing_class=AutoTokenizer.from_pretrained(checkpoint), callbacks=[timer])
    trainer.train()
    return timer.times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True, help="a tiny-math checkpoint with tokenizer (e.g. the warm start)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    results = {"TRL GRPOTrainer": trl(a.checkpoint, a.steps), "dspost grpo": ours(a.checkpoint, a.steps),
               # each sequence in a row of its own: the padded layout, to show what packing the update gives
               "dspost unpacked": ours(a.checkpoint, a.steps, "algorithm.pack_len=1")}
    print(f"GRPO step, {PROMPTS} prompts x {N} completions, <= {MAX_TOKENS} tokens, median of steps "
          f"{a.warmup + 1}..{a.steps}")
    base = statistics.median(results["TRL GRPOTrainer"][a.warmup:])
    for name, times in results.items():
        med = statistics.median(times[a.warmup:])
        print(f"  {name:<16} {med:7.2f} s/step  {base / med:5.2f}x")


if __name__ == "__main__":
    main()
