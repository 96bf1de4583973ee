"""Synthetic math problems with sympy-checkable answers and worked solutions.

Levels: 1 one-step add/subtract, 2 multiply or two-step, 3 linear equations, 4 fractions and
multi-step expressions. Train and held-out sets come from disjoint seeds and share no question."""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction

EVAL_SEED_OFFSET = 1_000_003
SYSTEM_HINT = "Solve the problem. Put the final answer in \\boxed{}."


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    solution: str
    level: int


def _box(x) -> str:
    return f"The answer is \\boxed{{{x}}}."


def _level1(r: random.Random) -> Problem:
    a, b = r.randint(1, 50), r.randint(1, 50)
    if r.random() < 0.5:
        return Problem(f"What is {a} + {b}?", str(a + b), f"{a} + {b} = {a + b}. {_box(a + b)}", 1)
    a, b = max(a, b), min(a, b)
    return Problem(f"What is {a} - {b}?", str(a - b), f"{a} - {b} = {a - b}. {_box(a - b)}", 1)


def _level2(r: random.Random) -> Problem:
    a, b, c = r.randint(2, 12), r.randint(2, 12), r.randint(1, 30)
    if r.random() < 0.5:
        return Problem(f"What is {a} * {b}?", str(a * b), f"{a} * {b} = {a * b}. {_box(a * b)}", 2)
    return Problem(f"What is {a} * {b} + {c}?", str(a * b + c),
                   f"{a} * {b} = {a * b}. {a * b} + {c} = {a * b + c}. {_box(a * b + c)}", 2)


def _level3(r: random.Random) -> Problem:
    a, x, b = r.randint(2, 12), r.randint(1, 20), r.randint(1, 30)
    c = a * x + b
    return Problem(f"Solve for x: {a}x + {b} = {c}", str(x),
                   f"{a}x = {c} - {b} = {c - b}. x = {c - b} / {a} = {x}. {_box(x)}", 3)


def _level4(r: random.Random) -> Problem:
    a, b, c, d = r.randint(1, 9), r.randint(2, 9), r.randint(1, 9), r.randint(2, 9)
    s = Fraction(a, b) + Fraction(c, d)
    ans = str(s.numerator) if s.denominator == 1 else f"\\frac{{{s.numerator}}}{{{s.denominator}}}"
    common = b * d
    return Problem(f"What is {a}/{b} + {c}/{d}? Give the answer as a reduced fraction.", ans,
                   f"{a}/{b} + {c}/{d} = {a * d}/{common} + {c * b}/{common} = {a * d + c * b}/{common} = "
                   f"{s.numerator}/{s.denominator}. {_box(ans)}", 4)


LEVELS = {1: _level1, 2: _level2, 3: _level3, 4: _level4}


def generate(n: int, seed: int, levels: list[int], exclude: set[str] = frozenset()) -> list[Problem]:
    unknown = sorted(set(levels) - set(LEVELS))
    if unknown:
        raise ValueError(f"data.difficulty: unknown levels {unknown} (have {sorted(LEVELS)})")
    r = random.Random(seed)
    out, seen = [], set(exclude)
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"data: only {len(out)} distinct problems exist at levels {levels}, asked for {n}")
        p = LEVELS[r.choice(levels)](r)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def splits(num_train: int, num_eval: int, seed: int, levels: list[int]) -> tuple[list[Problem], list[Problem]]:
    """A fixed held-out split first, then training problems that never repeat a held-out question."""
    held_out = generate(num_eval, seed + EVAL_SEED_OFFSET, levels)
    train = generate(num_train, seed, levels, exclude={p.question for p in held_out})
    return train, held_out


def messages(p: Problem, with_solution: bool = True) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": p.question}]
    if with_solution:
        msgs.append({"role": "assistant", "content": p.solution})
    return msgs


def corpus(n: int = 8000, seed: int = 12345) -> list[str]:
    """Text for training the tiny tokenizer: questions and solutions at every level."""
    return [f"{p.question} {p.solution}" for p in generate(n, seed, sorted(LEVELS))]
