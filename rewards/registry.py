"""Rewards by name or dotted path, combined as a weighted sum.

A reward is `fn(response: str, example: dict, **options) -> Verdict`, run inside the scoring pool's worker
processes. `example` carries the prompt's fields (`answer` for math; `tests`/`entry_point`/`prompt` or
`cases` for code); `options` come from the recipe's `rewards.terms[i].options`."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from dspost.rewards.code import extract_code, run_code_tests, run_io_tests
from dspost.rewards.constraints import instruct_reward
from dspost.rewards.ifeval import ifeval_reward
from dspost.rewards.math import verify_math
from dspost.rewards.verdict import Verdict


def math_reward(response: str, example: dict) -> Verdict:
    if example.get("answer") is None:
        return Verdict(0.0, "error", None, "example has no gold answer")
    return verify_math(response, str(example["answer"]))


_THINK = re.compile(r"^\s*<think>(.*?)</think>(.*)$", re.S)


def format_reward(response: str, example: dict, think: str = "optional", boxed: bool = True, min_chars: int = 0,
                  max_chars: int | None = None) -> Verdict:
    """1 when the response has the asked-for structure, else 0 with the failed checks in `detail`.

    `think`: "required" (it opens with a closed, non-empty <think>...</think>), "optional" (a <think> it
    opens must be closed and non-empty), "forbidden" (no <think>). The answer is what follows </think> (or
    the whole response): it must be non-empty, hold a \\boxed{} when `boxed`, and have between `min_chars`
    and `max_chars` characters."""
    if think not in ("required", "optional", "forbidden"):
        return Verdict(0.0, "error", None, f"format reward: think={think!r} is not required, optional or forbidden")
    failed = []
    m = _THINK.match(response)
    opened = "<think>" in response
    if opened and (m is None or not m[1].strip()):
        failed.append("unclosed or empty <think> block")
    if think == "required" and m is None and not failed:
        failed.append("no <think> block")
    if think == "forbidden" and opened:
        failed.append("<think> block not allowed")
    answer = (m[2] if m else response).strip()
    if not answer:
        failed.append("no answer after the thinking")
    if boxed and "\\boxed{" not in answer:
        failed.append("no \\boxed{} answer")
    if len(answer) < min_chars:
        failed.append(f"answer shorter than {min_chars} characters")
    if max_chars is not None and len(answer) > max_chars:
        failed.append(f"answer longer than {max_chars} characters")
    return Verdict(0.0 if failed else 1.0, "wrong" if failed else "correct", None, "; ".join(failed))


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


REWARDS: dict[str, Callable[..., Verdict]] = {"math": math_reward, "format": format_reward, "code": code_reward,
                                             "instruct": instruct_reward, "ifeval": ifeval_reward}


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
