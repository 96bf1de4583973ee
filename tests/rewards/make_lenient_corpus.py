"""Writes math_lenient_corpus.jsonl: un-boxed responses with right and wrong final answers, labelled by construction,
for `verify_math(..., extraction="lenient")`.

Each case is one MATH-500 or GSM8K test problem: an optional preamble (the reference solution cut before the
sentence that states its answer, so no earlier statement of an answer competes with the final one), then a final
statement that gives either
- the gold answer written another way (label `correct`): bare, `$..$`, `\\(..\\)`, `\\[..\\]`, "The answer is ...",
  `x = ...`, sentence endings, units, Unicode minus, `{,}` / `\\,` / comma thousands, `\\dfrac`, `\\frac12`, `a/b`,
  terminating decimals, ... Rewrites of numbers are computed with exact Fractions; other answers keep the gold's
  own LaTeX, only re-wrapped or with `\\dfrac`/`\\left` spelling changes; or
- a different answer (label `wrong`): n+1, n-1, -n, 2n, 10n, swapped digits, (p+1)/q, q/p, one digit of the
  gold's LaTeX changed, another multiple-choice letter. Each changes the value; perturbations of non-integers
  change it by more than 0.1%, outside the verifier's documented rel_tol of 1e-4 for answers written as decimals.
No verifier is run to make a label. Golds that are words (`\\text{Evelyn}`) are left out: they are not math answers.

Splits: `dev` (the verifier was tuned on it): MATH-500 rows with an even index, phrasings DEV, seed 0.
`heldout` (not tuned on): MATH-500 rows with an odd index and GSM8K test rows, phrasings HELD, seed 1.

    python tests/rewards/make_lenient_corpus.py [--data ../shared/data] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from fractions import Fraction
from pathlib import Path

OUT = Path(__file__).with_name("math_lenient_corpus.jsonl")
N_DEV, N_HELD_MATH, N_HELD_GSM = 125, 75, 75

# Final statements. {A}: the answer as rendered; {P}: the preamble (may be empty). `eq` templates need a scalar.
DEV = {
    "bare": "{A}", "dollars": "${A}$", "paren": "\\({A}\\)", "bracket": "\\[{A}\\]",
    "answer_is": "{P}The answer is {A}.", "answer_is_math": "{P}The answer is ${A}$.",
    "minerva": "{P}Therefore, the final answer is ${A}$. I hope it is correct.", "answer_colon": "{P}Answer: {A}",
    "bold_answer": "{P}**Answer:** ${A}$", "no_period": "{P}So the answer is {A}",
    "eq": "{P}Thus $x = {A}$.", "total": "{P}This gives a total of {A}.", "value_math": "{P}Hence the value is ${A}$.",
}
HELD = {
    "final_colon": "{P}Final answer: {A}", "display": "{P}$$ {A} $$", "solution_is": "{P}The solution is \\( {A} \\).",
    "conclude": "{P}So, we conclude that it equals {A}.", "chain": "{P}\\[ {C} = {A} \\]", "bold": "{P}**{A}**",
    "units": "{P}The answer to the question is {A} in total.", "result": "{P}Final result: {A}.",
    "which": "{P}We get {A}, which is the answer.", "newline_answer": "{P}Answer:\n\n{A}",
}
BARE_ONLY = {"bare", "dollars", "paren", "bracket"}  # a whole response that is only the answer: no preamble


# ------------------------------------------------------------------------------------------ gold answers
def _latex_arg(s: str, i: int) -> tuple[str, int] | None:
    """A `{..}` group or one character of s at i (spaces skipped)."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        j = s.find("}", i)
        return (s[i + 1:j], j + 1) if j > 0 else None
    return s[i], i + 1


def number_of(gold: str) -> tuple[Fraction, str] | None:
    """(value, unit) of a gold that is a plain number, fraction or decimal, perhaps with a degree or text unit."""
    s = gold.strip().replace(",\\!", ",").replace("\\!", "").replace("\\$", "").strip()
    unit = ""
    m = re.fullmatch(r"(.*?)\s*(\^\\circ|\^\{\\circ\}|\\(?:text|mbox)\{\s*[a-z ]+\}(?:\^2)?)", s)
    if m:
        s, unit = m[1].strip(), m[2]
    if re.fullmatch(r"-?\d+|-?\d{1,3}(?:,\d{3})+", s):
        return Fraction(int(s.replace(",", ""))), unit
    if re.fullmatch(r"-?\d*\.\d+", s):
        return Fraction(s), unit
    m = re.fullmatch(r"(-?)\\[dt]?frac(.*)", s)
    if m:
        a = _latex_arg(m[2], 0)
        b = _latex_arg(m[2], a[1]) if a else None
        if a and b and b[1] == len(m[2]) and a[0].isdigit() and b[0].isdigit() and int(b[0]) != 0:
            return Fraction(int(a[0]), int(b[0])) * (-1 if m[1] else 1), unit
    return None


# ---------------------------------------------------------------------------------------- rendering
def _thousands(n: int, sep: str) -> str:
    return f"{n:,}".replace(",", sep)


def render_number(v: Fraction, rng: random.Random, decimal_gold: bool) -> tuple[str, str]:
    """(text, how) for the value v, in one of the ways people write it."""
    neg, a = v < 0, abs(v)
    if a.denominator == 1:
        n = a.numerator
        ways = {"plain": str(n)}
        if n >= 1000:
            ways.update({"commas": _thousands(n, ","), "latex_commas": _thousands(n, "{,}"),
                         "thin_space": _thousands(n, "\\,")})
    else:
        p, q = a.numerator, a.denominator
        ways = {"frac": f"\\frac{{{p}}}{{{q}}}", "dfrac": f"\\dfrac{{{p}}}{{{q}}}", "slash": f"{p}/{q}"}
        if p < 10 and q < 10:
            ways["frac_short"] = f"\\frac{p}{q}"
        if 10 ** 12 % q == 0:  # a terminating decimal: exact
            ways["decimal"] = _decimal(a)
        if decimal_gold and "decimal" in ways:
            ways = {"decimal": ways["decimal"], "decimal_zero": ways["decimal"] + "0", "frac": ways["frac"]}
    how = rng.choice(sorted(ways))
    text = ways[how]
    if neg:
        sign = rng.choice(["-", "−"])
        how += "+unicode_minus" if sign == "−" else ""
        text = sign + text
    return text, how


def _decimal(a: Fraction) -> str:
    k = 0
    assert 10 ** 12 % a.denominator == 0, a  # terminating
    while (a * 10 ** k).denominator != 1:
        k += 1
    digits = str((a * 10 ** k).numerator).rjust(k + 1, "0")
    return digits[:-k] + "." + digits[-k:] if k else digits


def wrong_number(v: Fraction, rng: random.Random, decimal_gold: bool) -> tuple[Fraction, str]:
    """A different value, with how it was made."""
    if v.denominator == 1:
        n = v.numerator
        ways = {"plus1": n + 1, "minus1": n - 1, "plus10": n + 10}
        if n:
            ways.update({"negated": -n, "doubled": 2 * n, "times10": 10 * n})
        swapped = str(abs(n))[::-1]
        if abs(n) >= 10 and swapped[0] != "0" and int(swapped) != abs(n):
            ways["digits_swapped"] = int(swapped) * (-1 if n < 0 else 1)
    else:
        p, q = v.numerator, v.denominator
        ways = {"numerator_plus1": Fraction(p + 1, q), "plus1": v + 1, "negated": -v}
        if p:
            ways["inverted"] = 1 / v
    if decimal_gold or v.denominator != 1:  # may be written as a decimal: stay outside the verifier's rel_tol
        ways = {k: w for k, w in ways.items() if abs(w - v) > Fraction(1, 1000) * max(abs(v), 1)}
    how = rng.choice(sorted(ways))
    w = Fraction(ways[how])
    assert w != v, (v, how)
    return w, how


def respell_latex(g: str, rng: random.Random) -> tuple[str, str]:
    """The gold's own LaTeX with a spelling change that keeps its value."""
    ways = {"as_is": g}
    if "\\frac" in g:
        ways["dfrac"] = g.replace("\\frac", "\\dfrac")
    if "\\dfrac" in g:
        ways["frac"] = g.replace("\\dfrac", "\\frac")
    if "\\left" in g:
        ways["no_left_right"] = g.replace("\\left", "").replace("\\right", "")
    if " " in g and "\\begin" not in g and not re.search(r"\\[a-zA-Z]+ [a-zA-Z]", g):
        ways["no_spaces"] = g.replace(" ", "")
    how = rng.choice(sorted(ways))
    return ways[how], how


def wrong_latex(g: str, rng: random.Random) -> tuple[str, str]:
    """A gold written in LaTeX made wrong: another choice letter, one digit changed, or negated."""
    m = re.fullmatch(r"\\text\{\(([A-E])\)\}", g)
    if m:
        return f"\\text{{({rng.choice([c for c in 'ABCDE' if c != m[1]])})}}", "other_choice"
    # digits outside command names and outside \begin{..}/\end{..}
    spots = [i for i, c in enumerate(g) if c.isdigit()]
    if spots:
        i = rng.choice(spots)
        return g[:i] + str((int(g[i]) + 1) % 10) + g[i + 1:], "digit_changed"
    return f"-({g})", "negated"


def scalar(text: str) -> bool:
    return not re.search(r"[=,]|\\cup|\\pm|\\begin|\\in\b|\\text|\\mbox|\\circ|_", text)


# ------------------------------------------------------------------------------------------ preambles
_SENTENCE_START = re.compile(r"(?:\.\s+|\n)(?=[A-Z$\\])")


def math_preamble(solution: str) -> str:
    """The reference solution before the sentence that states its boxed answer: the last whole sentences of it
    that fit in 300 characters ('' when none fit, or when the cut falls inside a `$..$` span)."""
    s = re.sub(r"\[asy\].*?\[/asy\]", "", solution, flags=re.S)
    cut = s.find("\\boxed")
    if cut < 0:
        return ""
    starts = [m.end() for m in _SENTENCE_START.finditer(s[:cut])]
    s = s[:starts[-1]].strip() if starts else ""
    if len(s) > 300:
        starts = [m.end() for m in _SENTENCE_START.finditer(s)]
        s = s[next((st for st in starts if len(s) - st <= 300), len(s)):].strip()
    if s.replace("$$", "").count("$") % 2:
        return ""
    return s + "\n\n" if s else ""


def gsm_preamble(answer: str) -> str:
    """The GSM8K solution's steps without the last one (which states the result) and without `<<..>>` notes."""
    lines = [re.sub(r"<<[^>]*>>", "", ln).strip() for ln in answer.split("####")[0].strip().split("\n")]
    return "\n".join(lines[:-1]).strip() + "\n\n" if len(lines) > 1 else ""


# -------------------------------------------------------------------------------------------- cases
def make_case(gold: str, preamble: str, templates: dict[str, str], label: str, rng: random.Random) -> dict:
    num = number_of(gold)
    decimal_gold = "." in gold
    if num is not None:
        value, unit = num
        how = "gold"
        if label == "wrong":
            value, how = wrong_number(value, rng, decimal_gold)
        text, spelling = render_number(value, rng, decimal_gold)
        if unit and "circ" in unit and rng.random() < 0.5:
            text, spelling = text + rng.choice(["^\\circ", "°", " degrees"]), spelling + "+degrees"
        is_int = value.denominator == 1
    else:
        text, how = (gold, "gold") if label == "correct" else wrong_latex(gold, rng)
        text, spelling = respell_latex(text, rng)
        value, is_int = None, False
    names = [t for t in sorted(templates) if (t not in ("eq", "chain") or scalar(text))]
    name = rng.choice(names)
    chain = ""
    if name == "chain":
        if is_int:
            k = rng.randint(1, 9)
            chain = f"{value - k} + {k}" if value - k >= 0 else f"{value + k} - {k}"
        else:
            chain = "x"
    use_pre = name not in BARE_ONLY and rng.random() < 0.7
    response = templates[name].format(A=text, P=preamble if use_pre else "", C=chain)
    return {"template": name, "how": f"{how}/{spelling}", "label": label, "response": response, "gold": gold}


def build(data: Path) -> list[dict]:
    math_rows = [json.loads(line) for line in (data / "math500" / "test.jsonl").read_text().splitlines()]
    gsm_rows = [json.loads(line) for line in (data / "gsm8k" / "test.jsonl").read_text().splitlines()]
    usable = [(i, r) for i, r in enumerate(math_rows) if not re.fullmatch(r"\\text\{[A-Za-z ]+\}", r["answer"].strip())]
    cases = []
    for split, seed, rows, templates in (
            ("dev", 0, [("math500", i, r) for i, r in usable if i % 2 == 0][:N_DEV], DEV),
            ("heldout", 1, [("math500", i, r) for i, r in usable if i % 2 == 1][:N_HELD_MATH]
             + [("gsm8k", i, r) for i, r in enumerate(gsm_rows[:N_HELD_GSM])], HELD)):
        rng = random.Random(seed)
        for source, i, row in rows:
            if source == "math500":
                gold, preamble = row["answer"].strip(), math_preamble(row["solution"])
            else:
                gold = row["answer"].split("####")[-1].strip().replace(",", "")
                preamble = gsm_preamble(row["answer"])
            for label in ("correct", "wrong"):
                case = make_case(gold, preamble, templates, label, rng)
                cases.append({"split": split, "source": f"{source}:{i}", **case})
    return cases


def main() -> None:
    p = argparse.ArgumentParser()
    env = os.environ.get("DSPOST_SHARED_DATA")
    default = Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"
    p.add_argument("--data", type=Path, default=default,
                   help="the shared data sets (default: $DSPOST_SHARED_DATA, else ../shared/data beside the repo)")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    cases = build(a.data)
    a.out.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cases), encoding="utf-8")
    print(f"{len(cases)} cases -> {a.out}")


if __name__ == "__main__":
    main()
