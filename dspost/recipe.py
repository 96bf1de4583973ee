"""Load a recipe file, apply `dotted.key=value` overrides, validate, and check the files it names.

Every failure is a `RecipeError` whose message is one line naming the dotted field or the path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dspost.config import RECIPE_KINDS, PipelineRecipe


class RecipeError(ValueError):
    """Bad input in a recipe or on the command line; the message is the one line shown to the user."""


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), max_steps: int | None = None) -> BaseModel:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
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
    return recipe


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> BaseModel:
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


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    # Drop the discriminator tag pydantic inserts after a list index (stages.0.sft.trainer -> stages.0.trainer).
    loc = [str(p) for p in err["loc"] if str(p) not in RECIPE_KINDS]
    field = ".".join(loc)
    if err["type"] == "extra_forbidden":
        return f"{field}: unknown key"
    msg = err["msg"].removeprefix("Value error, ")
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


def stages_of(recipe: BaseModel) -> list[tuple[str, BaseModel]]:
    """(dotted prefix, stage) for every runnable stage of the recipe."""
    if isinstance(recipe, PipelineRecipe):
        return [(f"stages.{i}.", s) for i, s in enumerate(recipe.stages)]
    return [("", recipe)]


def _cap_steps(recipe: BaseModel, max_steps: int) -> None:
    if max_steps < 1:
        raise RecipeError(f"--max-steps: must be at least 1, got {max_steps}")
    for _, stage in stages_of(recipe):
        trainer = getattr(stage, "trainer", None)
        if trainer is not None:
            trainer.max_steps = min(trainer.max_steps, max_steps)
            trainer.eval_every = min(trainer.eval_every, trainer.max_steps)
            trainer.save_every = min(trainer.save_every, trainer.max_steps)


def check_paths(recipe: BaseModel) -> None:
    """Every file or directory a recipe names must exist before anything starts.

    Paths are relative to the working directory, as on any command line."""
    for prefix, stage in stages_of(recipe):
        model = getattr(stage, "model", None)
        if model is not None and model.path and not Path(model.path).expanduser().is_dir():
            raise RecipeError(f"{prefix}model.path: no such checkpoint directory: {model.path}")
        data = getattr(stage, "data", None)
        for field in ("path", "eval_path"):
            value = getattr(data, field, None) if data is not None else None
            if value and not Path(value).expanduser().exists():
                raise RecipeError(f"{prefix}data.{field}: no such file or directory: {value}")
        for j, teacher in enumerate(getattr(stage, "teachers", []) or []):
            if teacher.path and not Path(teacher.path).expanduser().is_dir():
                raise RecipeError(f"{prefix}teachers.{j}.path: no such checkpoint directory: {teacher.path}")
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

