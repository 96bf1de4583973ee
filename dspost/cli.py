"""`dspost` command line: run, eval-rm, doctor, plot, merge-lora.

Bad input exits with code 2 and one line on stderr naming the field or path; nothing is started."""

from __future__ import annotations

import argparse
import sys

import yaml

EXIT_BAD_INPUT = 2
EXIT_RUN_STOPPED = 1  # the run refused to go on (non-finite numbers, parity, reward errors): no traceback


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

    ev = sub.add_parser("eval-rm", help="evaluate a critic on preference pairs (report.json, report.md, plots)",
                        description="Evaluate a critic on held-out preference pairs and check it with the meta-critic. "
                                    "Same as `dspost run` on a `kind: eval_rm` recipe (e.g. recipes/rm_eval.yaml).")
    ev.add_argument("--critic", required=True,
                    help="reward-model directory, a `kind: rm` recipe (its latest checkpoint), length, rule:NAME or judge:DIR")
    ev.add_argument("--data", default=None, help="pairs file or datasets directory (default: synthetic math pairs)")
    ev.add_argument("--format", default="auto", help="pairwise, llmbar, hh_rlhf or auto")
    ev.add_argument("--column", action="append", default=[], metavar="OURS=THEIRS",
                    help="map a column name (prompt, chosen, rejected, input, output_1, output_2, label, category, answer)")
    ev.add_argument("--output", default=None, help="run directory (default runs/eval_rm-<timestamp>)")
    ev.add_argument("--reference", default=None, help="meta-critic reference set (default: the shipped one)")
    ev.add_argument("--no-meta-critic", action="store_true", help="skip the meta-critic")
    ev.add_argument("--batch-size", type=int, default=16, help="pairs per critic call")
    ev.add_argument("--max-length", type=int, default=1024, help="tokens per (prompt, response); longer keep their end")
    ev.add_argument("--limit", type=int, default=None, help="only the first N pairs")

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
    return _run(recipe)


def _run(recipe) -> int:
    from dspost.data.loading import DataError
    from dspost.rl import ParityError, RewardError
    from dspost.model import CheckpointError
    from dspost.rewards.pool import PoolError
    from dspost.rollout.sync import SyncError
    from dspost.runner import run_recipe
    from dspost.training import NonFiniteError

    try:
        run_recipe(recipe)
    except (DataError, CheckpointError, NotImplementedError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (NonFiniteError, ParityError, PoolError, RewardError, SyncError) as e:  # a run that stopped itself: say why, once
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUN_STOPPED
    return 0


def critic_from_recipe(path: str) -> str:
    """A `kind: rm` recipe names its reward model by its run directory's latest checkpoint."""
    from pathlib import Path

    from dspost.recipe import RecipeError, load_recipe

    recipe = load_recipe(path)
    if recipe.kind != "rm" or not recipe.output_dir:
        raise RecipeError(f"--critic {path}: a critic recipe must be `kind: rm` with an output_dir")
    latest = Path(recipe.output_dir) / "checkpoints" / "latest"
    if not latest.is_file():
        raise RecipeError(f"--critic {path}: {recipe.output_dir} has no checkpoint yet (run the recipe first)")
    if recipe.trainer.lora:  # LoRA runs leave adapters in checkpoints/ and the full model in merged/
        return str(Path(recipe.output_dir) / "merged")
    return str(Path(recipe.output_dir) / "checkpoints" / latest.read_text().strip())


def cmd_eval_rm(args: argparse.Namespace) -> int:
    from dspost.recipe import RecipeError, check_paths, validate_recipe

    try:
        critic = critic_from_recipe(args.critic) if args.critic.endswith((".yaml", ".yml")) else args.critic
        columns = {}
        for item in args.column:
            ours, sep, theirs = item.partition("=")
            if not sep or not ours or not theirs:
                raise RecipeError(f"--column {item!r}: expected OURS=THEIRS")
            columns[ours] = theirs
        raw = {"kind": "eval_rm", "name": "eval_rm", "critic": critic, "output_dir": args.output,
               "data": {"path": args.data, "format": args.format, "columns": columns},
               "reference": args.reference, "meta_critic": not args.no_meta_critic,
               "batch_size": args.batch_size, "max_length": args.max_length, "limit": args.limit}
        recipe = validate_recipe(raw, source="eval-rm")
        check_paths(recipe)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return _run(recipe)


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


COMMANDS = {"run": cmd_run, "eval-rm": cmd_eval_rm, "doctor": cmd_doctor, "plot": cmd_plot,
            "merge-lora": cmd_merge_lora}


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
