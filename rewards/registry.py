"""Rewards by name or dotted path, combined as a weighted sum.

A reward is `fn(response: str, example: dict) -> Verdict`, run inside the scoring pool's worker processes.
`example` carries the prompt's fields (`answer` for math)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from dspost.rewards.math import verify_math
from dspost.rewards.verdict import Verdict


def math_reward(response: str, example: dict) -> Verdict:
    if example.get("answer") is None:
        return Verdict(0.0, "error", None, "example has no gold answer")
    return verify_math(response, str(example["answer"]))


_THINK_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*\S", re.S)


def format_reward(response: str, example: dict) -> Verdict:
    """1 when the response carries a \\boxed{} answer (after a closed <think> block if one is opened)."""
    if "<think>" in response and not _THINK_ANSWER.match(response):
        return Verdict(0.0, "wrong", None, "unclosed or empty <think> block")
    ok = "\\boxed{" in response
    return Verdict(1.0 if ok else 0.0, "correct" if ok else "wrong", None)


REWARDS: dict[str, Callable[[str, dict], Verdict]] = {"math": math_reward, "format": format_reward}


def resolve(name: str) -> str:
    """`module:function` target of a reward name (built-in) or dotted path `pkg.mod:fn` / `pkg.mod.fn`."""
    if name in REWARDS:
        return f"{__name__}:{REWARDS[name].__name__}"
    module, sep, fn = name.partition(":")
    if not sep:
        module, _, fn = name.rpartition(".")
    if not module:
        raise ValueError(f"rewards.terms: unknown reward {name!r} (built-in: {sorted(REWARDS)}; or pkg.module:function)")
    try:
        getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"rewards.terms: cannot import reward {name!r}: {e}") from None
    return f"{module}:{fn}"
