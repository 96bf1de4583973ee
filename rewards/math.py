"""Math answer verification: extract the final answer, normalise LaTeX, compare as structured values.

Comparison is exact (sympy rationals and symbolic simplification) unless a side is a decimal literal,
which is compared with a relative tolerance. Structures: equations (`x=5` vs `5`; lhs-rhs up to sign),
intervals and unions, unordered sets (`\\{...\\}`, `\\pm`, `or`), ordered tuples, matrices. Exponent towers and
huge factorials are refused before sympy tries to evaluate them. This function has no time limit of its own:
`verify_math_batch` runs it in worker processes with a hard wall-clock and memory limit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from dspost.rewards.verdict import Verdict

# ------------------------------------------------------------------------------------------- extraction
_THINK = re.compile(r"<think>.*?</think>", re.S)
_PHRASES = [
    re.compile(r"final answer is[:\s]*(.+?)(?:\.\s|\.$|\n|$)", re.I),
    re.compile(r"answer\s*(?:is)?\s*:\s*(.+?)(?:\n|$)", re.I),
    re.compile(r"the answer is[:\s]*(.+?)(?:\.\s|\.$|\n|$)", re.I),
]
_BOLD = re.compile(r"\*\*([^*]+?)\*\*")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.S)


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at text[start] == '{', and the index after it."""
    depth = 0
    for j in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[start + 1: j], j + 1
    return None


def last_boxed(text: str) -> str | None:
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        got = _braced(text, m.end() - 1)
        if got is not None:
            best = got[0]
    return best


def extract_answer(text: str, allow_last_number: bool = False) -> str | None:
    """The last `\\boxed{}`; else a GSM8K `#### N`; else a "final answer is" / "Answer:" phrase; else the last **bold**;
    else, only when allowed, the last number."""
    text = _THINK.sub("", text)
    if "<think>" in text:  # an unclosed think block holds no final answer
        text = text.split("<think>")[0]
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    gsm = _GSM8K.search(text)
    if gsm:
        return gsm[1].strip()
    for pat in _PHRASES:
        hits = pat.findall(text)
        if hits:
            ans = hits[-1].strip().strip("*").strip()
            inner = last_boxed(ans)
            return (inner if inner is not None else ans).strip().rstrip(".")
    bold = _BOLD.findall(text)
    if bold:
        return bold[-1].strip()
    if allow_last_number:
        nums = _NUMBER.findall(text)
        if nums:
            return nums[-1]
    return None


def gold_answer(gold: str) -> str:
    m = _GSM8K.search(gold)
    if m:
        return m[1]
    boxed = last_boxed(gold)
    return boxed if boxed is not None else gold


# ---------------------------------------------------------------------------------------- normalisation
UNITS = (
    "degrees", "degree", "cm", "mm", "km", "m", "meters", "meter", "inches", "inch", "feet", "foot", "ft",
    "miles", "mile", "hours", "hour", "minutes", "minute", "seconds", "second", "sec", "days", "day", "weeks",
    "years", "year", "dollars", "dollar", "cents", "cent", "units", "unit", "square", "sq", "pounds", "lbs", "kg",
    "grams", "g", "liters", "liter", "ml", "mph", "points", "percent",
)
_UNIT_RE = re.compile(r"(?<=[\d}\s])\s*(?:\\(?:text|mbox|mathrm)\{\s*)?(?:" + "|".join(UNITS) + r")\b\}?(\^?\{?[23]\}?)?",
                      re.I)
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def normalise(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?=[\\()\[\]|.{}])", "", s)
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "").replace("\\ ", " ")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\displaystyle", "")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree", "", s)
    s = s.replace("\\%", "%").replace("\\$", "")
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = _UNIT_RE.sub("", s) if re.search(r"\d", s) else s
    s = re.sub(r"^\s*[a-zA-Z]\s*\\in\s*", "", s)  # "x \in [1,2]" -> "[1,2]"
    s = s.strip().rstrip(".,").strip()
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    s = re.sub(r"(?<![\d.,])0+(?=\d)", "", s)  # leading zeros: "007" -> "7"
    return re.sub(r"\s+", " ", s)


# ------------------------------------------------------------------------------------ LaTeX -> sympy
class Refused(ValueError):
    """An expression too large to evaluate safely (exponent tower, huge power or factorial)."""


_FUNCS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
          "log", "ln", "exp", "sqrt"}


def latex_to_sympy_str(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            m = re.match(r"\\([a-zA-Z]+)", s[i:])
            name = m[1] if m else s[i + 1: i + 2]
            i += len(name) + 1
            if name == "frac":
                num, i = _arg(s, i)
                den, i = _arg(s, i)
                out.append(f"(({latex_to_sympy_str(num)})/({latex_to_sympy_str(den)}))")
            elif name == "sqrt":
                index = None
                if i < len(s) and s[i] == "[":
                    j = s.index("]", i)
                    index, i = s[i + 1: j], j + 1
                body, i = _arg(s, i)
                body = latex_to_sympy_str(body)
                out.append(f"(({body})**(1/({latex_to_sympy_str(index)})))" if index else f"sqrt({body})")
            elif name in ("cdot", "times"):
                out.append("*")
            elif name == "div":
                out.append("/")
            elif name == "pi":
                out.append(" pi ")
            elif name == "infty":
                out.append(" oo ")
            elif name in ("ln", "log"):
                out.append(" log")
            elif name in _FUNCS:
                out.append(f" {name}")
            elif name in ("{", "}"):
                out.append("(" if name == "{" else ")")
            else:
                raise ValueError(f"unsupported LaTeX command \\{name}")
        elif c == "{":
            out.append("(")
            i += 1
        elif c == "}":
            out.append(")")
            i += 1
        elif c == "^":
            out.append("**")
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _arg(s: str, i: int) -> tuple[str, int]:
    while i < len(s) and s[i] == " ":
        i += 1
    if i < len(s) and s[i] == "{":
        got = _braced(s, i)
        if got is None:
            raise ValueError("unbalanced braces")
        return got
    if i < len(s):
        return s[i], i + 1  # \frac12 style single-token argument
    raise ValueError("missing argument")


def _check_size(expr) -> None:
    import sympy

    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Pow):
            base, exp = node.args
            if isinstance(exp, sympy.Pow) and exp.args[0].is_number and exp.args[1].is_number \
                    and abs(float(exp.args[1])) > 1 and abs(float(exp.args[0])) > 1:
                raise Refused("exponent tower")
            if base.is_Rational and exp.is_Number and base != 0:
                # log10 |base| from its integer parts: exact and safe for huge numbers
                mag = abs(float(exp)) * max(abs(math.log10(abs(int(base.p))) - math.log10(int(base.q))), 0.3)
                if mag > 10_000:
                    raise Refused("power too large")
        elif isinstance(node, sympy.factorial) and node.args[0].is_number and abs(float(node.args[0])) > 5000:
            raise Refused("factorial too large")
        elif isinstance(node, sympy.Integer) and abs(node) > 10 ** 10_000:
            raise Refused("number too large")


def to_sympy(s: str):
    import sympy
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                            standard_transformations)

    text = latex_to_sympy_str(s).replace("%", "/100")
    if re.search(r"\*\*\s*\(?\s*\d+\s*\)?\s*\*\*", text):
        raise Refused("exponent tower")
    if re.search(r"[\d)]\s*!", text):
        for m in re.finditer(r"(\d+)\s*!", text):
            if int(m[1]) > 5000:
                raise Refused("factorial too large")
    letters = {ch: sympy.Symbol(ch) for ch in set(re.findall(r"(?<![a-zA-Z])[a-zA-Z](?![a-zA-Z])", text))}
    letters.update(pi=sympy.pi, oo=sympy.oo, sqrt=sympy.sqrt, log=sympy.log, E=sympy.Symbol("E"))
    expr = parse_expr(text, local_dict=letters, evaluate=False,
                      transformations=standard_transformations + (implicit_multiplication_application, convert_xor))
    _check_size(expr)
    return expr


# ------------------------------------------------------------------------------------------ structures
@dataclass
class Value:
    kind: str  # expr, eq, set, tuple, interval, matrix
    items: tuple
    inexact: bool = False


def _split_top(s: str, sep: str = ",") -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _is_inexact(s: str) -> bool:
    return bool(re.search(r"\d\.\d|^\.\d|[^\d]\.\d|\d\.$", s))


def parse_value(s: str) -> Value:
    import sympy

    s = normalise(s)
    if not s:
        raise ValueError("empty answer")
    m = re.match(r"^\\begin\{[pbv]?matrix\}(.*)\\end\{[pbv]?matrix\}$", s, re.S)
    if m:
        rows = [[to_sympy(c.strip()) for c in r.split("&")] for r in m[1].strip().split("\\\\") if r.strip()]
        if len({len(r) for r in rows}) != 1:
            raise ValueError("ragged matrix")
        return Value("matrix", (sympy.Matrix(rows),), _is_inexact(s))
    if "\\pm" in s:
        a, _, b = s.partition("\\pm")
        a = a.strip() or "0"
        return Value("set", (to_sympy(f"{a}+({b})"), to_sympy(f"{a}-({b})")), _is_inexact(s))
    if re.search(r"\s(?:or|and)\s", s):
        return Value("set", tuple(to_sympy(p) for p in re.split(r"\s(?:or|and)\s", s)), _is_inexact(s))
    if s.startswith("\\{") and s.endswith("\\}"):
        return Value("set", tuple(to_sympy(p) for p in _split_top(s[2:-2]) if p), _is_inexact(s))
    if "\\cup" in s or (s[:1] in "([" and s[-1:] in ")]" and ("oo" in s or "infty" in s or s[0] + s[-1] in ("[)", "(]", "[]"))):
        return Value("interval", (_interval(s),), _is_inexact(s))
    if s[:1] == "(" and s[-1:] == ")" and len(_split_top(s[1:-1])) > 1:
        return Value("tuple", tuple(to_sympy(p) for p in _split_top(s[1:-1])), _is_inexact(s))
    if "," in s and len(_split_top(s)) > 1:
        return Value("set", tuple(to_sympy(p) for p in _split_top(s)), _is_inexact(s))
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        return Value("eq", (to_sympy(lhs), to_sympy(rhs)), _is_inexact(s))
    return Value("expr", (to_sympy(s),), _is_inexact(s))


def _interval(s: str):
    import sympy

    parts = [p.strip() for p in s.split("\\cup")]
    out = sympy.EmptySet
    for p in parts:
        if p[:1] not in "([" or p[-1:] not in ")]":
            raise ValueError(f"not an interval: {p}")
        lo, hi = _split_top(p[1:-1])
        lo, hi = (sympy.nsimplify(to_sympy(x.replace("\\infty", "oo")).doit(), rational=True) for x in (lo, hi))
        out = out | sympy.Interval(lo, hi, left_open=p[0] == "(", right_open=p[-1] == ")")
    return out


# ------------------------------------------------------------------------------------------ equality
def _expr_equal(a, b, tol: float | None) -> bool:
    import sympy

    if a == b:
        return True
    try:
        diff = sympy.simplify(sympy.sympify(a) - sympy.sympify(b))
    except (TypeError, ValueError, AttributeError):
        return False
    if diff == 0:
        return True
    if diff.free_symbols:
        return _equal_at_points(diff)
    if tol is not None:
        try:
            fa, fb = complex(sympy.N(a, 30)), complex(sympy.N(b, 30))
        except (TypeError, ValueError):
            return False
        return abs(fa - fb) <= tol * max(abs(fa), abs(fb), 1e-12)
    return False


def _equal_at_points(diff, points: int = 4) -> bool:
    """Expressions simplify misses (sqrt(1/n) vs 1/sqrt(n)): zero at several fixed positive points."""
    import random

    import sympy

    rng = random.Random(0)
    syms = sorted(diff.free_symbols, key=str)
    for _ in range(points):
        at = {x: sympy.Rational(rng.randint(11, 37), 10) for x in syms}
        try:
            v = complex(diff.subs(at).evalf(30))
        except (TypeError, ValueError, ZeroDivisionError):
            return False
        if abs(v) > 1e-9:
            return False
    return True


def values_equal(p: Value, g: Value, tol: float) -> bool:
    t = tol if (p.inexact or g.inexact) else None
    import sympy

    # "x = 5" answers a gold of 5 and 5 answers a gold "x = 5": an assignment to one variable is its value.
    if p.kind == "eq" and g.kind != "eq":
        return isinstance(p.items[0], sympy.Symbol) and values_equal(Value("expr", (p.items[1],), p.inexact), g, tol)
    if g.kind == "eq" and p.kind != "eq":
        return isinstance(g.items[0], sympy.Symbol) and values_equal(p, Value("expr", (g.items[1],), g.inexact), tol)
    if p.kind != g.kind:
        if {p.kind, g.kind} == {"set", "expr"}:
            s, e = (p, g) if p.kind == "set" else (g, p)
            return len(s.items) == 1 and _expr_equal(s.items[0], e.items[0], t)
        if {p.kind, g.kind} == {"set", "tuple"}:
            return False  # order matters for tuples and not for sets: refuse to guess
        return False
    if p.kind == "expr":
        return _expr_equal(p.items[0], g.items[0], t)
    if p.kind == "eq":
        d1 = sympy.sympify(p.items[0]) - sympy.sympify(p.items[1])
        d2 = sympy.sympify(g.items[0]) - sympy.sympify(g.items[1])
        return _expr_equal(d1, d2, t) or _expr_equal(d1, -d2, t)
    if p.kind == "tuple":
        return len(p.items) == len(g.items) and all(_expr_equal(a, b, t) for a, b in zip(p.items, g.items))
    if p.kind == "set":
        if len(p.items) != len(g.items):
            return False
        left = list(g.items)
        for a in p.items:
            hit = next((i for i, b in enumerate(left) if _expr_equal(a, b, t)), None)
            if hit is None:
                return False
            left.pop(hit)
        return True
    if p.kind == "interval":
        return p.items[0] == g.items[0]
    if p.kind == "matrix":
        a, b = p.items[0], g.items[0]
        return a.shape == b.shape and all(_expr_equal(x, y, t) for x, y in zip(a, b))
    return False


def verify_math(response: str, gold: str, *, allow_last_number: bool = False, rel_tol: float = 1e-4,
                extract: bool = True) -> Verdict:
    """Grade a model response against a gold answer (a bare answer, a `\\boxed{}` solution, or GSM8K `#### N`)."""
    pred = extract_answer(response, allow_last_number) if extract else response
    if pred is None:
        return Verdict(0.0, "unparsable", None, "no final answer found")
    gold_s = gold_answer(gold)
    if normalise(pred) == normalise(gold_s):
        return Verdict(1.0, "correct", pred)
    try:
        g = parse_value(gold_s)
    except Refused as e:
        return Verdict(0.0, "error", pred, f"gold answer refused: {e}")
    except Exception as e:  # noqa: BLE001 - an unreadable gold answer is our error, not the model's
        return Verdict(0.0, "error", pred, f"gold answer unparsable: {type(e).__name__}: {e}")
    try:
        p = parse_value(pred)
    except Refused as e:
        return Verdict(0.0, "unparsable", pred, f"refused: {e}")
    except Exception as e:  # noqa: BLE001 - sympy raises many types on malformed input
        return Verdict(0.0, "unparsable", pred, f"{type(e).__name__}: {e}")
    percent = pred.rstrip().endswith("%") and not gold_s.rstrip().endswith("%")
    if percent:  # "50%" answers a gold of 50 or of 0.5
        try:
            p_bare = parse_value(pred.rstrip().rstrip("%").rstrip("\\"))
        except Exception:  # noqa: BLE001
            p_bare = p
        ok = values_equal(p, g, rel_tol) or values_equal(p_bare, g, rel_tol)
    else:
        ok = values_equal(p, g, rel_tol)
    return Verdict(1.0 if ok else 0.0, "correct" if ok else "wrong", pred)
