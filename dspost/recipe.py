"""Load a recipe file, apply `dotted.key=value` overrides, validate, and check the files it names.

Every failure is a `RecipeError` whose message is one line naming the dotted field or the path.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dspost.config import RECIPE_KINDS, PipelineRecipe, Recipe, RewardTerm, StageRecipe


class RecipeError(ValueError):
    """Bad input in a recipe or on the command line; the message is the one line shown to the user."""


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), max_steps: int | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of fields, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    raw.setdefault("name", path.stem)
    recipe = validate_recipe(raw, source=str(path))
    if max_steps is not None:
        _cap_steps(recipe, max_steps)
    check_paths(recipe)
    check_rewards(recipe)
    check_runnable(recipe)
    return recipe


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    kind = raw.get("kind")
    if kind not in RECIPE_KINDS:
        raise RecipeError(f"{source}: kind: must be one of {sorted(RECIPE_KINDS)}, got {kind!r}")
    raw = _with_kind_defaults(raw)
    try:
        return RECIPE_KINDS[kind].model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"{source}: {_first_error(e)}") from None


def _with_kind_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """Under the recipe's own fields, the defaults a stage kind gives its sections (GRPO's trainer has lr 1e-5,
    not the trainer's 1e-3): pydantic would rebuild a partly given section from the section's class defaults."""
    cls = RECIPE_KINDS.get(raw.get("kind"))
    if cls is None:
        return raw
    out = dict(raw)
    for name, field in cls.model_fields.items():
        if field.default_factory is None or not isinstance(out.get(name), dict):
            continue
        default = field.default_factory()
        if isinstance(default, BaseModel):
            out[name] = {**default.model_dump(exclude_unset=True), **out[name]}
    if isinstance(out.get("stages"), list):
        out["stages"] = [_with_kind_defaults(st) if isinstance(st, dict) else st for st in out["stages"]]
    return out


_FIELD_FIRST = re.compile(r"^[A-Za-z_][\w.]*: ")


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    # Drop the discriminator tag pydantic inserts after a list index (stages.0.sft.trainer -> stages.0.trainer).
    loc = [str(p) for p in err["loc"] if str(p) not in RECIPE_KINDS]
    field = ".".join(loc)
    if err["type"] == "extra_forbidden":
        return f"{field}: unknown key"
    msg = err["msg"].removeprefix("Value error, ")
    if field and err["type"] == "value_error" and _FIELD_FIRST.match(msg):
        return f"{field}.{msg}"  # a stage validator naming its own field: stages.0 + rollout.n: ...
    if err["type"] in ("missing", "literal_error", "union_tag_invalid", "value_error") or "input" not in err:
        return f"{field}: {msg}" if field else msg
    return f"{field}: {msg} (got {err['input']!r})"


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {item!r}: expected dotted.key=value")
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"override {key}: {'.'.join(parts[:i + 1])} is not an index of the list")
            node = node[int(part)]
            continue
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise RecipeError(f"override {key}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node = child
    if isinstance(node, list):
        raise RecipeError(f"override {key}: cannot replace a list element by key")
    node[parts[-1]] = parsed


def stages_of(recipe: Recipe) -> list[tuple[str, StageRecipe]]:
    """(dotted prefix, stage) for every runnable stage of the recipe."""
    if isinstance(recipe, PipelineRecipe):
        return [(f"stages.{i}.", s) for i, s in enumerate(recipe.stages)]
    return [("", recipe)]


def _cap_steps(recipe: Recipe, max_steps: int) -> None:
    if max_steps < 1:
        raise RecipeError(f"--max-steps: must be at least 1, got {max_steps}")
    for _, stage in stages_of(recipe):
        trainer = getattr(stage, "trainer", None)
        if trainer is not None:
            trainer.max_steps = min(trainer.max_steps, max_steps)
            trainer.eval_every = min(trainer.eval_every, trainer.max_steps)
            trainer.save_every = min(trainer.save_every, trainer.max_steps)


def _checkpoint_problem(path: str) -> str | None:
    """Why `path` is not a Hugging Face checkpoint directory (every loader here reads its config.json), else None."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return f"no such checkpoint directory: {path}"
    if not (p / "config.json").is_file():
        return f"{path}: no config.json (not a Hugging Face checkpoint directory)"
    return None


# What `datasets.load_from_disk` (which `read_rows` uses for a directory) looks for: a saved Dataset or DatasetDict.
_SAVED_DATASET = ("dataset_info.json", "state.json")
_SAVED_DATASET_DICT = "dataset_dict.json"


def _data_problem(path: str) -> str | None:
    """Why `path` cannot be read as data (a file, or a directory saved by `datasets`' `save_to_disk`), else None."""
    p = Path(path).expanduser()
    if not p.exists():
        return f"no such file or directory: {path}"
    if not p.is_dir():
        return None
    if all((p / f).is_file() for f in _SAVED_DATASET):
        return None
    if (p / _SAVED_DATASET_DICT).is_file():
        try:
            splits = json.loads((p / _SAVED_DATASET_DICT).read_text()).get("splits", [])
        except (OSError, ValueError, AttributeError) as e:
            return f"{path}: unreadable {_SAVED_DATASET_DICT} ({e})"
        return None if "train" in splits else f"{path}: the saved DatasetDict has no `train` split (has {splits})"
    try:
        empty = not any(p.iterdir())
    except OSError as e:
        return f"{path}: cannot be read ({e.strerror})"
    if empty:
        return f"{path}: empty directory"
    return (f"{path}: a directory that is not a saved `datasets` dataset (no {' + '.join(_SAVED_DATASET)} or "
            f"{_SAVED_DATASET_DICT}); name a JSONL/JSON/Parquet/CSV file, or write the dataset with `save_to_disk`")


def transformers_policy_problem(stage: StageRecipe, model_class: str) -> str | None:
    """What RL implements for our checkpoints only, asked of a policy that is a transformers `model_class`, else
    None (the router-bias update does not apply to it and is skipped, as in SFT)."""
    if stage.kind not in ("grpo", "opd"):
        return None
    used = {"trainer.lora": stage.trainer.lora is not None, "sync.quantize": stage.sync.quantize != "none"}
    field = next((f for f, on in used.items() if on), None)
    return None if field is None else (
        f"{field}: implemented for deepseek_v3 checkpoints in RL; the policy is a {model_class} (vLLM fuses its "
        "projections under names our LoRA merge and FP8 sync do not write)")


def check_paths(recipe: Recipe) -> None:
    """Every file or directory a recipe names must exist, and be of the kind it names, before anything starts.

    Paths are relative to the working directory, as on any command line."""
    for prefix, stage in stages_of(recipe):
        model = getattr(stage, "model", None)
        if model is not None and model.path and (problem := _checkpoint_problem(model.path)):
            raise RecipeError(f"{prefix}model.path: {problem}")
        if model is not None and model.path:
            cfg = json.loads((Path(model.path).expanduser() / "config.json").read_text())
            arch = (cfg.get("architectures") or [cfg.get("model_type")])[0]
            if cfg.get("model_type") != "deepseek_v3" and (problem := transformers_policy_problem(stage, arch)):
                raise RecipeError(f"{prefix}{problem}")
        data = getattr(stage, "data", None)
        for field in ("path", "eval_path"):
            value = getattr(data, field, None) if data is not None else None
            if value and (problem := _data_problem(value)):
                raise RecipeError(f"{prefix}data.{field}: {problem}")
        for j, src in enumerate(getattr(data, "sources", None) or []):
            for field in ("path", "eval_path"):
                value = getattr(src, field)
                if value and (problem := _data_problem(value)):
                    raise RecipeError(f"{prefix}data.sources.{j}.{field}: {problem}")
        for j, teacher in enumerate(getattr(stage, "teachers", []) or []):
            if teacher.path and (problem := _checkpoint_problem(teacher.path)):
                raise RecipeError(f"{prefix}teachers.{j}.path: {problem}")
        rewards = getattr(stage, "rewards", None)
        reference = rewards.meta_critic.reference if rewards is not None and rewards.meta_critic else None
        if reference and not Path(reference).expanduser().is_file():
            raise RecipeError(f"{prefix}rewards.meta_critic.reference: no such file: {reference}")
        if getattr(stage, "kind", None) == "eval_rm":
            if stage.reference and not Path(stage.reference).expanduser().is_file():
                raise RecipeError(f"{prefix}reference: no such file: {stage.reference}")
            from dspost.rewards.critics import parse_critic

            kind, rest = parse_critic(stage.critic)
            if kind in ("judge", "model") and not (Path(rest).expanduser() / "config.json").is_file():
                raise RecipeError(f"{prefix}critic: {rest}: no such checkpoint directory (or one without config.json); "
                                  f"expected length, rule:NAME, judge:DIR or a reward-model directory")
            if kind == "rule":
                from dspost.rewards.registry import REWARDS

                if rest not in REWARDS:
                    raise RecipeError(f"{prefix}critic: unknown rule {rest!r} (registered: {sorted(REWARDS)})")


def check_runnable(recipe: Recipe) -> None:
    """Every stage's kind has a runner: a pipeline never spends its first stages' compute and then stops at a
    later stage's start."""
    from dspost.runner import STAGE_RUNNERS

    if recipe.kind == "evaluate":
        raise RecipeError("kind: an evaluate stage grades the checkpoints of earlier stages: put it among the stages "
                          "of a kind: pipeline recipe")
    if recipe.kind != "pipeline":  # a stage reference resolves only inside a pipeline
        model = getattr(recipe, "model", None)
        refs = [("model.from_stage", model.from_stage)] if model is not None and model.from_stage else []
        refs += [(f"teachers.{j}.from_stage", t.from_stage) for j, t in enumerate(getattr(recipe, "teachers", []))
                 if t.from_stage and not t.path]
        if refs:
            raise RecipeError(f"{refs[0][0]}: {refs[0][1]!r} names a pipeline stage, but this recipe is a single "
                              "stage; give a path, or run it inside a kind: pipeline recipe")
    for prefix, stage in stages_of(recipe):
        if stage.kind not in STAGE_RUNNERS:
            raise RecipeError(f"{prefix}kind: {stage.kind} stages are not implemented yet "
                              f"(available: {', '.join(sorted(STAGE_RUNNERS))})")


def check_rewards(recipe: Recipe) -> None:
    """Resolve every reward term now, as the run would after starting Ray, vLLM and the trainer.

    A built-in name or a `pkg.module:function` must import (the user's module is imported here, in the CLI
    process; the built-ins cost ~20 ms and no torch) and accept the term's options; `critic:rule:NAME` must be
    registered and `critic:DIR` a checkpoint directory."""
    for prefix, stage in stages_of(recipe):
        rewards = getattr(stage, "rewards", None)
        for j, term in enumerate(rewards.terms if rewards is not None else []):
            where = f"{prefix}rewards.terms.{j}"
            problem = _critic_problem(term) if term.name.startswith("critic:") else _reward_problem(term)
            if problem:
                raise RecipeError(f"{where}.{problem}")
            if term.name in ("code", "critic:rule:code"):
                _refuse_unless_available(f"{where}.name", "sandbox_unavailable")
        if stage.kind != "rm":  # every other stage grades answers in the scoring pool (SFT: held-out accuracy)
            _refuse_unless_available(f"{prefix}kind: {stage.kind}", "pool_unavailable")
        if getattr(stage, "critic", "") == "rule:code":
            _refuse_unless_available(f"{prefix}critic", "sandbox_unavailable")


def _refuse_unless_available(where: str, check: str) -> None:
    """The scoring pool's (network-isolated workers) or the code sandbox's pre-flight, cached per process."""
    from dspost.rewards import pool, sandbox

    problem = getattr(pool if check == "pool_unavailable" else sandbox, check)()
    if problem:
        raise RecipeError(f"{where}: {problem}")


def _reward_problem(term: RewardTerm) -> str | None:
    """`name: ...` or `options: ...` when the term's function cannot be imported or called with its options."""
    from dspost.rewards.registry import REWARDS, resolve

    try:
        module, _, fn_name = resolve(term.name).partition(":")
        fn = getattr(importlib.import_module(module), fn_name)
    except Exception as e:
        message = str(e)
        if isinstance(e, ValueError) and message.startswith("rewards.terms: "):  # resolve's own one-line message
            return f"name: {message.removeprefix('rewards.terms: ')}"
        # The user's module raised while importing (SyntaxError, RuntimeError, ...).
        return f"name: cannot import reward {term.name!r}: {type(e).__name__}: {(message.splitlines() or [''])[0]}"
    if not callable(fn):
        return f"name: {term.name!r} is not a function"
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        return None
    try:
        signature.bind("", {}, **term.options)
    except TypeError as e:
        known = [name for name, p in list(signature.parameters.items())[2:] if p.kind is not p.VAR_KEYWORD]
        kind = "built-in reward" if term.name in REWARDS else "reward"
        return f"options: {e} ({kind} {term.name!r} takes {known or 'no options'})"
    return None


def _critic_problem(term: RewardTerm) -> str | None:
    from dspost.rewards.critics import parse_critic
    from dspost.rewards.registry import REWARDS

    if term.options:
        return f"options: critic terms take no options (got {sorted(term.options)})"
    kind, rest = parse_critic(term.name.removeprefix("critic:"))
    if kind == "rule" and rest not in REWARDS:
        return f"name: unknown rule {rest!r} (registered: {sorted(REWARDS)})"
    if kind == "model" and (problem := _checkpoint_problem(rest)):
        return f"name: {problem}; expected critic:length, critic:rule:NAME or critic:DIR (a reward-model checkpoint)"
    return None
