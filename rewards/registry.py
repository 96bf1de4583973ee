"""Rewards by name or dotted path, combined as a weighted sum.

A reward is `fn(response: str, example: dict, **options) -> Verdict`, run inside the scoring pool's worker
processes. `example` carries the prompt's fields (`answer` for math; `tests`/`entry_point`/`prompt` or
`cases` for code); `options` come from the recipe's `rewards.terms[i].options`."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from dspost.rewards.code import extract_code, run_code_tests, run_io_tests
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


def code_reward(response: str, example: dict, partial: bool = False, timeout: float = 4.0) -> Verdict:
    """The response's last fenced code block run in the sandbox against the example's `tests` (asserts or a
    HumanEval `check` with `entry_point`; a HumanEval-style completion is appended to its `prompt`) or its
    stdin/stdout `cases` ([[input, output], ...])."""
    code = extract_code(response)
    entry = example.get("entry_point")
    if entry and example.get("prompt") and f"def {entry}" not in code:
        code = example["prompt"] + code
    if example.get("cases"):
        return run_io_tests(code, [tuple(c) for c in example["cases"]], timeout, partial=partial)
    if not example.get("tests"):
        return Verdict(0.0, "error", None, "example has neither tests nor cases")
    return run_code_tests(code, example["tests"], timeout, entry_point=entry, partial=partial)


REWARDS: dict[str, Callable[..., Verdict]] = {"math": math_reward, "format": format_reward, "code": code_reward}


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
