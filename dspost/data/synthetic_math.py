"""Synthetic math problems with sympy-checkable answers and worked solutions.

Levels: 1 the larger of two numbers, 2 the largest or smallest of three, 3 one-digit sums and products,
4 two-digit sums worked column by column (ones, carry, tens), 5 a*b + c, 6 linear equations, 7 sums of
fractions. Levels 1-2 are what the tiny model learns (and generalises to unseen numbers) within minutes
on a CPU, so they carry the RL demo; the column method of level 4 is a procedure over ~100 one-digit facts. Train and held-out sets come from disjoint seeds and share no question."""

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


def _larger(r: random.Random) -> Problem:
    a, b = r.sample(range(1, 100), 2)
    return Problem(f"Which is larger, {a} or {b}?", str(max(a, b)),
                   f"{max(a, b)} > {min(a, b)}. {_box(max(a, b))}", 1)


def _extreme_of_three(r: random.Random) -> Problem:
    xs = r.sample(range(1, 100), 3)
    word, pick = ("largest", max) if r.random() < 0.5 else ("smallest", min)
    listed = ", ".join(map(str, xs))
    return Problem(f"What is the {word} of {listed}?", str(pick(xs)),
                   f"The {word} of {listed} is {pick(xs)}. {_box(pick(xs))}", 2)


def _one_digit(r: random.Random) -> Problem:
    a, b = r.randint(1, 9), r.randint(1, 9)
    if r.random() < 0.5:
        return Problem(f"What is {a} + {b}?", str(a + b), f"{a} + {b} = {a + b}. {_box(a + b)}", 3)
    return Problem(f"What is {a} * {b}?", str(a * b), f"{a} * {b} = {a * b}. {_box(a * b)}", 3)


def _column_sum(r: random.Random) -> Problem:
    a, b = r.randint(10, 99), r.randint(10, 99)
    ones = a % 10 + b % 10
    carry = ones // 10
    tens = a // 10 + b // 10 + carry
    first = f"{a % 10} + {b % 10} = {ones}" + (f", write {ones % 10} carry 1" if carry else "")
    second = f"{a // 10} + {b // 10}" + (" + 1" if carry else "") + f" = {tens}"
    return Problem(f"What is {a} + {b}?", str(a + b), f"{first}. {second}. {_box(a + b)}", 4)


def _product_plus(r: random.Random) -> Problem:
    a, b, c = r.randint(2, 12), r.randint(2, 12), r.randint(1, 30)
    return Problem(f"What is {a} * {b} + {c}?", str(a * b + c),
                   f"{a} * {b} = {a * b}. {a * b} + {c} = {a * b + c}. {_box(a * b + c)}", 5)


def _linear(r: random.Random) -> Problem:
    a, x, b = r.randint(2, 12), r.randint(1, 20), r.randint(1, 30)
    c = a * x + b
    return Problem(f"Solve for x: {a}x + {b} = {c}", str(x),
                   f"{a}x = {c} - {b} = {c - b}. x = {c - b} / {a} = {x}. {_box(x)}", 6)


def _fractions(r: random.Random) -> Problem:
    a, b, c, d = r.randint(1, 9), r.randint(2, 9), r.randint(1, 9), r.randint(2, 9)
    s = Fraction(a, b) + Fraction(c, d)
    ans = str(s.numerator) if s.denominator == 1 else f"\\frac{{{s.numerator}}}{{{s.denominator}}}"
    common = b * d
    return Problem(f"What is {a}/{b} + {c}/{d}? Give the answer as a reduced fraction.", ans,
                   f"{a}/{b} + {c}/{d} = {a * d}/{common} + {c * b}/{common} = {a * d + c * b}/{common} = "
                   f"{s.numerator}/{s.denominator}. {_box(ans)}", 7)


LEVELS = {1: _larger, 2: _extreme_of_three, 3: _one_digit, 4: _column_sum, 5: _product_plus, 6: _linear, 7: _fractions}


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
