"""`dspost` command line: run, doctor, plot, merge-lora.

Bad input exits with code 2 and one line on stderr naming the field or path; nothing is started."""

from __future__ import annotations

import argparse
import sys

import yaml

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dspost", description="Post-training for DeepSeek-style MoE models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe (sft, grpo, opd, eval_rm, pipeline)",
                         description="Run a recipe. Overrides are dotted.key=value (values parsed as YAML), "
                                     "e.g. trainer.lr=1e-4 output_dir=runs/x resume=true.")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="field overrides")
    run.add_argument("--max-steps", type=int, default=None, help="cap every stage at N optimizer steps (smoke runs)")
    run.add_argument("--dry-run", action="store_true", help="print the resolved config and the resource plan, then exit")

    sub.add_parser("doctor", help="pre-flight checks with the fix for each failure",
                   description="Check Python, torch, transformers, vLLM, Ray, devices, memory and disk.")

    plot = sub.add_parser("plot", help="write PNG curves of a run's metrics",
                          description="Write RUN_DIR/plots/*.png from RUN_DIR/metrics.jsonl.")
    plot.add_argument("run_dir", help="a run directory")

    merge = sub.add_parser("merge-lora", help="fold a PEFT LoRA adapter into its base model",
                           description="Write a full checkpoint: base model + adapter, merged.")
    merge.add_argument("adapter", help="adapter directory (PEFT format, e.g. RUN/checkpoints/step_N)")
    merge.add_argument("output", help="directory for the merged checkpoint (written atomically)")
    merge.add_argument("--base", default=None, help="base model directory (default: the adapter's base_model_name_or_path)")
    return p


def cmd_run(args: argparse.Namespace) -> int:
    from dspost.plan import check_plan, format_plans
    from dspost.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides, args.max_steps)
        plans = check_plan(recipe)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.dry_run:
        print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False).rstrip())
        print("---\nresource plan:")
        print(format_plans(plans))
        return 0
    from dspost.data.loading import DataError
    from dspost.model import CheckpointError
    from dspost.runner import run_recipe

    try:
        run_recipe(recipe)
    except (DataError, CheckpointError, NotImplementedError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from dspost.doctor import run_doctor

    return run_doctor()


def cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dspost.plots import plot_run

    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        print(f"error: {args.run_dir}: no metrics.jsonl (not a run directory)", file=sys.stderr)
        return EXIT_BAD_INPUT
    for path in plot_run(args.run_dir):
        print(path)
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from dspost.lora import merge_lora

    try:
        print(merge_lora(args.adapter, args.output, args.base))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


COMMANDS = {"run": cmd_run, "doctor": cmd_doctor, "plot": cmd_plot, "merge-lora": cmd_merge_lora}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may follow options (`run R --max-steps 3 a.b=1`), which plain argparse rejects.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if args.command != "run" or e.startswith("-") or "=" not in e]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = args.overrides + extra
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
