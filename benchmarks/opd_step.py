"""An OPD step's time split against a GRPO step's, side by side in one invocation (issue #20).

Both stages run `--steps` steps from the same checkpoint with the same rollout settings (the default recipe's: 16
prompts x 8 samples, max 48 tokens, T=1) and the same seed, so their first step generates the identical batch; later
batches differ as the two policies move apart. OPD distils from one teacher (`--teacher`, default: the starting
checkpoint itself, which has the default GRPO run's cost profile) with the sampled estimator; GRPO is the default
recipe (GSPO, math rewards). Reported per phase: the median over steps 2.. (step 1 also compiles) of `time/<phase>`
from each run's metrics.jsonl, and each step's total (evaluation and checkpointing are switched off).

    python benchmarks/opd_step.py [--checkpoint DIR] [--teacher DIR] [--steps 6]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

PHASES = ("generate", "teacher", "score", "advantages", "update", "sync")


def run(kind: str, checkpoint: str, teacher: str, steps: int, out: Path) -> list[dict]:
    from dspost.cli import main
    from dspost.rundir import read_metrics

    common = [f"model.path={checkpoint}", f"output_dir={out}", "trainer.eval_every=1000000",
              "trainer.save_every=1000000", "data.num_eval=4", f"--max-steps={steps}"]
    if kind == "grpo":
        args = ["run", "recipes/grpo_math.yaml", *common]
    else:
        recipe = out.parent / "opd.yaml"
        grpo = Path("recipes/grpo_math.yaml").read_text().replace("kind: grpo", "kind: opd")
        grpo = grpo.replace("algorithm:\n  loss: gspo\n", "")
        recipe.write_text(grpo + f"teachers:\n  - path: {teacher}\n")
        args = ["run", str(recipe), *common, "rewards.terms=[{name: math, weight: 0}]"]
    assert main(args) == 0, args
    return [r for r in read_metrics(out) if r["step"] >= 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="starting checkpoint (default: the tiny-math warm start)")
    ap.add_argument("--teacher", help="teacher checkpoint (default: the starting checkpoint)")
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    if a.checkpoint is None:
        from dspost.config import ModelSection
        from dspost.runner import start_from

        a.checkpoint = str(start_from(ModelSection(), None))
    teacher = a.teacher or a.checkpoint
    root = Path(tempfile.mkdtemp(prefix="opd-step-"))
    rows = {kind: run(kind, a.checkpoint, teacher, a.steps, root / kind) for kind in ("grpo", "opd")}
    print(f"\nmedian seconds per phase over steps 2..{a.steps} (same start, same seed; step 1 same batch)")
    print(f"{'phase':<12}{'grpo':>10}{'opd':>10}")
    for phase in (*PHASES, "step"):
        cells = []
        for kind in ("grpo", "opd"):
            vals = [r[f"time/{phase}"] for r in rows[kind][1:] if f"time/{phase}" in r]
            cells.append(f"{statistics.median(vals):>10.3f}" if vals else f"{'-':>10}")
        print(f"{phase:<12}{''.join(cells)}")
    for kind in ("grpo", "opd"):
        tokens = statistics.median(r["train/tokens"] for r in rows[kind][1:])
        print(f"{kind}: trainer tokens per step (median) {tokens:.0f}")


if __name__ == "__main__":
    main()
