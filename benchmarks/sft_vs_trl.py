"""LoRA SFT throughput and peak memory: dspost's SFT stage vs TRL's `SFTTrainer` + PEFT, side by side.

Same checkpoint (the tiny-math warm start, which transformers loads as `DeepseekV3ForCausalLM`), same data (the
synthetic math conversations, loss on assistant tokens), same batch (16 sequences or, packed, 16 rows of 256
tokens), same LoRA (r 16, alpha 32, on the MLA projections), fp32 on the CPU. Each trainer runs alone in its own
process (peak RSS is that process's VmHWM). Tokens/s: the tokens of the timed steps (after 3 warm-up steps) over
their time, counted with padding ("padded") and without ("real"). Configurations: unpacked and packed (TRL:
`packing=True`, padding-free), each with the same objective as TRL (next-token loss: transformers' model has no
MTP layer, so ours runs with `model.mtp_loss_weight=0`); `--mtp` adds our default objective (MTP loss 0.3);
`--compile` adds both trainers compiled (ours `trainer.compile=true`, TRL `torch_compile=True`), with more
warm-up steps so that compilation and the dynamic-shape recompile stay out of the timing.

    python benchmarks/sft_vs_trl.py --checkpoint DIR [--steps 20] [--mtp] [--compile]
    python benchmarks/sft_vs_trl.py --checkpoint DIR --rounds 3 [--only packed]

`--rounds R`: TRL in its fastest configuration on this CPU, unpacked and eager (its compiled run is slower and its
padding-free packing attends over the whole batch as one 4,096-token sequence), against ours eager and compiled,
alternated R rounds so drift hits all three; by default ours on the same batch (16 samples per step, which ours
runs padding-free), with `--only packed` ours on packed rows. Real (non-padding) tokens/s, the ratio per round.

TRL reads the dataset sequentially, laid out in the order ours draws its batches, so both train on the same 16
samples at every step (the alternated runs check that their tokens per step agree): with each drawing its own
order, TRL's padding, and so its real tokens/s, depended on which batches fell in the timed window.
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

BATCH = 16
COMPILE_WARMUP = 3  # extra untimed steps for a compiled run: the first compilation and the dynamic-shape recompile
TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def ours(checkpoint: str, steps: int, warmup: int, pack: bool, mtp: bool, compile: bool) -> dict:
    out = Path(tempfile.mkdtemp()) / "run"
    cmd = [sys.executable, "-m", "dspost", "run", "recipes/sft_lora.yaml", f"model.path={checkpoint}",
           f"output_dir={out}", f"trainer.max_steps={steps}", f"trainer.batch_size={BATCH}", "trainer.grad_accum=1",
           f"trainer.eval_every={steps + 1}", f"trainer.save_every={steps + 1}", "data.difficulty=[1, 2, 3, 4]",
           f"data.pack={str(pack).lower()}", f"model.mtp_loss_weight={0.3 if mtp else 0}",
           f"trainer.compile={str(compile).lower()}"]
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > warmup and "eval/loss" not in r]
    seconds = sum(r["time/step"] for r in timed)
    return {"padded": sum(r["perf/tokens_per_s"] * r["time/step"] for r in timed) / seconds,
            "real": sum(r["train/tokens"] for r in timed) / seconds,
            "peak_gib": int(proc.stderr.split()[-1]) / 2**20, "wall_s": wall,
            "step_tokens": [int(r["train/tokens"]) for r in rows if "train/tokens" in r]}


def trl(checkpoint: str, steps: int, warmup: int, pack: bool, compile: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from dspost.data.synthetic_math import messages, splits
    from dspost.data.packing import batch_indices

    torch.manual_seed(0)
    train, _ = splits(4000, 200, 0, [1, 2, 3, 4])  # ours: the recipe's defaults (num_train 4000, seed 0)
    # TRL reads the dataset in order, laid out as ours draws its batches, so step k is the same 16 samples in both.
    order = [i for step in range(steps) for i in batch_indices(len(train), BATCH, step, 0)]
    ds = Dataset.from_list([{"messages": messages(train[i])} for i in order])
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    times: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append((time.perf_counter() - self.t, state.global_step))

    tokens_per_step: list[tuple[int, int]] = []
    cfg = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, max_steps=steps,
                    learning_rate=1e-3, logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True,
                    max_length=256, packing=pack, assistant_only_loss=True, dataloader_num_workers=0, seed=0,
                    torch_compile=compile, train_sampling_strategy="sequential")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS), callbacks=[Clock()])
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        padded = int(batch["input_ids"].numel())  # padding-free (packed) batches carry no attention mask
        tokens_per_step.append((padded, int(batch["attention_mask"].sum()) if "attention_mask" in batch else padded))
        return batch

    trainer.data_collator = counting
    trainer.train()
    timed = [(dt, n) for (dt, _), n in zip(times, tokens_per_step)][warmup:]
    seconds = sum(dt for dt, _ in timed)
    return {"padded": sum(n[0] for _, n in timed) / seconds, "real": sum(n[1] for _, n in timed) / seconds,
            "peak_gib": peak_rss_gib(), "step_tokens": [n[1] for n in tokens_per_step]}


def trl_in_subprocess(checkpoint: str, steps: int, warmup: int, config: str, compile: bool) -> dict:
    """TRL in a fresh process of its own, so that its peak RSS is its own."""
    out = subprocess.run([sys.executable, __file__, "--checkpoint", checkpoint, "--steps", str(steps), "--warmup",
                          str(warmup), "--trl-only", config] + ["--trl-compile"] * compile,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def alternated(checkpoint: str, steps: int, warmup: int, rounds: int, pack: bool) -> None:
    """TRL unpacked and eager (its fastest here) against ours eager and compiled, R alternating rounds."""
    config = "packed" if pack else "unpacked (the same 16 samples per step, padding-free)"
    print(f"| round | TRL unpacked, eager | dspost {config}, eager | ratio | dspost, compiled | ratio | peak RSS "
          "(TRL / eager / compiled) |")
    print("|---|---|---|---|---|---|---|")
    ratios: list[tuple[float, float]] = []
    real: list[tuple[float, float, float]] = []
    for i in range(rounds):
        theirs = trl_in_subprocess(checkpoint, steps, warmup, "unpacked", False)
        eager = ours(checkpoint, steps, warmup, pack, False, False)
        compiled = ours(checkpoint, steps, warmup + COMPILE_WARMUP, pack, False, True)
        if not pack and not theirs["step_tokens"] == eager["step_tokens"] == compiled["step_tokens"]:
            raise RuntimeError("TRL and dspost did not see the same samples at every step (tokens per step differ)")
        ratios.append((eager["real"] / theirs["real"], compiled["real"] / theirs["real"]))
        real.append((theirs["real"], eager["real"], compiled["real"]))
        peaks = " / ".join(f"{r['peak_gib']:.2f}" for r in (theirs, eager, compiled))
        print(f"| {i + 1} | {theirs['real']:.0f} | {eager['real']:.0f} | {ratios[-1][0]:.2f}x | "
              f"{compiled['real']:.0f} | {ratios[-1][1]:.2f}x | {peaks} GiB |", flush=True)
    mean = [statistics.mean(x[k] for x in real) for k in range(3)]
    for k, mode in enumerate(("eager", "compiled")):
        r = [x[k] for x in ratios]
        print(f"{mode}: median ratio {statistics.median(r):.2f}x, min {min(r):.2f}x, ratio of the mean throughputs "
              f"{mean[k + 1] / mean[0]:.2f}x, {sum(x >= 2 for x in r)} of {len(r)} rounds at 2x or more")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mtp", action="store_true", help="also run ours with its default MTP loss")
    ap.add_argument("--warmup", type=int, default=3, help=f"untimed first steps (compiled runs add {COMPILE_WARMUP})")
    ap.add_argument("--compile", action="store_true", help="also run both trainers compiled")
    ap.add_argument("--only", choices=["packed", "unpacked"], help="one configuration")
    ap.add_argument("--trl-only", choices=["packed", "unpacked"], help=argparse.SUPPRESS)  # the TRL process itself
    ap.add_argument("--trl-compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, metavar="R",
                    help="TRL's fastest (unpacked, eager) against ours eager and compiled, R alternating rounds, on "
                         "the --only configuration of ours (default unpacked)")
    args = ap.parse_args()
    if args.rounds:
        alternated(args.checkpoint, args.steps, args.warmup, args.rounds, args.only == "packed")
        return
    if args.trl_only:
        warmup = args.warmup + COMPILE_WARMUP * args.trl_compile
        print(json.dumps(trl(args.checkpoint, args.steps, warmup, args.trl_only == "packed", args.trl_compile)))
        return
    print(f"LoRA SFT, batch {BATCH}, {args.steps} steps ({args.warmup} warm-up), fp32, CPU")
    print("| config | trainer | padded tokens/s | real tokens/s | real vs TRL | peak RSS |")
    print("|---|---|---|---|---|---|")
    for pack in (False, True):
        name = "packed" if pack else "unpacked"
        if args.only and args.only != name:
            continue
        for compile in (False, True) if args.compile else (False,):
            tag, warmup = (", compiled", args.warmup + COMPILE_WARMUP) if compile else ("", args.warmup)
            theirs = trl_in_subprocess(args.checkpoint, args.steps, args.warmup, name, compile)
            runs = [("TRL SFTTrainer + PEFT" + tag, theirs),
                    ("dspost sft (LoRA)" + tag, ours(args.checkpoint, args.steps, warmup, pack, False, compile))]
            if args.mtp:
                runs.append(("dspost sft (LoRA), MTP loss on" + tag,
                             ours(args.checkpoint, args.steps, warmup, pack, True, compile)))
            for label, r in runs:
                print(f"| {name} | {label} | {r['padded']:.0f} | {r['real']:.0f} | {r['real'] / theirs['real']:.2f}x | "
                      f"{r['peak_gib']:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
