"""Low-precision training against fp32: the tiny-math SFT from random initialisation, run three times with
the same seed and data order — fp32, `trainer.quantization=fp8`, `trainer.quantization=fp4-qat` — and the
loss curves compared (DeepSeek-V3 reports FP8 training within 0.25% relative loss of BF16).

    python benchmarks/fp8_training.py --steps 300 --seed 0 --out runs/fp8_training/seed0
    # continued training from a checkpoint (e.g. the warm start) at a lower learning rate, all levels:
    python benchmarks/fp8_training.py --init DIR --lr 3e-4 --difficulty 1,2,3,4 --out runs/fp8_training/cont
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "sft_tiny_math.yaml"
MODES = ("none", "fp8", "fp4-qat")


def losses(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="runs/fp8_training")
    ap.add_argument("--window", type=int, default=20, help="average the training loss over the last N steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", help="start from this checkpoint instead of random initialisation")
    ap.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    ap.add_argument("--difficulty", help="synthetic levels, e.g. 1,2,3,4 (default: the recipe's)")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    modes = args.modes.split(",")
    settings = ([f"trainer.lr={args.lr}"] if args.lr else []) + (
        [f"data.difficulty=[{args.difficulty}]"] if args.difficulty else [])
    extra = ([f"model.path={args.init}"] if args.init else []) + settings
    out = Path(args.out)
    for mode in modes:
        run = out / mode
        if not (run / "checkpoints" / "latest").is_file():
            subprocess.run([sys.executable, "-m", "dspost", "run", str(RECIPE), f"output_dir={run}",
                            f"trainer.quantization={mode}", f"trainer.max_steps={args.steps}", f"trainer.seed={args.seed}",
                            f"trainer.eval_every={args.steps // 3}", f"trainer.save_every={args.steps}", *extra], check=True)
    rows = {mode: losses(out / mode) for mode in modes}
    last = range(args.steps - args.window + 1, args.steps + 1)
    base_train = sum(rows["none"][s]["train/loss"] for s in last) / args.window
    base_eval = rows["none"][args.steps]["eval/loss"]
    start = f"from {args.init}" if args.init else "from random init"
    print(f"tiny-math SFT {start}, {args.steps} steps, seed {args.seed}, {' '.join(settings)}; "
          f"train loss = mean of the last {args.window} steps")
    print("| mode | train loss | vs fp32 | held-out loss | vs fp32 | held-out accuracy | s/step |")
    print("|---|---|---|---|---|---|---|")
    for mode in modes:
        tr = sum(rows[mode][s]["train/loss"] for s in last) / args.window
        ev = rows[mode][args.steps]["eval/loss"]
        acc = rows[mode][args.steps].get("eval/accuracy", float("nan"))
        sec = sum(r["time/step"] for r in rows[mode].values()) / len(rows[mode])
        print(f"| {'fp32' if mode == 'none' else mode} | {tr:.4f} | {100 * (tr / base_train - 1):+.2f}% | {ev:.4f} | "
              f"{100 * (ev / base_eval - 1):+.2f}% | {acc:.3f} | {sec:.2f} |")


if __name__ == "__main__":
    main()
