"""Math answer verification: extract the final answer, normalise LaTeX, compare as structured values.

Extraction: `strict` (RL rewards, the default) reads a boxed, `####`, "final answer is"/"Answer:" or bold answer;
`lenient` (grading other models' outputs) reads the final expression however it is written (`extract_lenient`).
Parsing: `math_parse.to_sympy`, a whitelist tokenizer and parser that builds sympy objects directly; model output
never reaches `eval`, `exec`, `parse_expr` or `sympify`. Comparison is exact (sympy rationals and symbolic
simplification) unless a side is a decimal literal, which is compared with a relative tolerance. Structures:
equations (`x=5` vs `5`; lhs-rhs up to sign), intervals and unions, unordered sets (`\\{...\\}`, `\\pm`, `or`),
ordered tuples, matrices. Exponent towers, huge powers and factorials are refused before sympy evaluates them.
This function has no time limit of its own: `verify_math_batch` runs it in worker processes with a hard
wall-clock and memory limit.
"""

from __future__ import annotations

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
# The last number, read as a LaTeX atom: `\\frac12` is one number (not its `2`), `2^{10}` keeps its exponent.
_NUMBER = re.compile(r"""
    [-−]?\\(?:[dt]?frac|[dt]?binom)\s*(?:\{[^{}]*\}|\w)\s*(?:\{[^{}]*\}|\w)
  | [-−]?\\sqrt\s*(?:\[[^\]]*\])?\s*(?:\{[^{}]*\}|\w)
  | [-−]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\^\{[^{}]*\}|\^\d+)?
""", re.X)
_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.S)
# Unicode as people type it (−7 with U+2212, 2×3, π) read as the LaTeX it stands for; both modes, both sides.
_UNICODE = {"−": "-", "×": "\\times ", "÷": "\\div ", "·": "\\cdot ", "⋅": "\\cdot ", "π": "\\pi ",
            "∞": "\\infty ", "√": "\\sqrt ", "\u2009": " ", "\u202f": " ", "\u00a0": " "}
_UNICODE_RE = re.compile("|".join(_UNICODE))


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


# ----------------------------------------------------------------------------------- lenient extraction
# For grading other models' free-form outputs: the final expression however it is written. The text is read
# as math items (`$..$`, `\(..\)`, `\[..\]`, `$$..$$` spans, numbers, LaTeX commands, operators, variables) and
# prose; consecutive math items form a run, and runs joined by `,`/and/or form one answer (a list). The answer
# is the first one after the last "answer is"/"answer:" phrase, else the last one of the text, and never an
# earlier one when that fails to parse: falling back to earlier numbers is how a wrong final answer gets
# graded by a correct intermediate one.
_SPAN = re.compile(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\((.+?)\\\)|(?<![\\\d$])\$(?!\s)((?:\\\$|[^\n$])+?)(?<![\s\\])\$", re.S)
_LEX = re.compile(r"""
    (?P<matrix>\\begin\{(?P<env>[pbvV]?matrix)\}.*?\\end\{(?P=env)\})
  | (?P<text>\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf|operatorname)\s*\{[^{}]*\})
  | (?P<cmd>\\[a-zA-Z]+|\\[{}%,!;:\ ])
  | (?P<num>\d{1,3}(?:,\d{3})+(?![\d,])(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)
  | (?P<word>[A-Za-z]+)
  | (?P<op>[-+*/^=()\[\]{}!%_|<>])
  | (?P<sep>,)
  | (?P<ws>[ \t]+)
  | (?P<other>(?s:.))
""", re.X | re.S)
_ANCHOR = re.compile(r"\banswer\b(?:\s+to\b[^.\n:]{0,80}?)?\s*(?:is|would be|will be|should be|=|:)(?:\s*:)?", re.I)
_WORD_MATH = {"sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "sqrt", "pi"}
_PROSE_CMDS = {"quad", "qquad", "hline", "item", "newline", "hfill", "ldots", "dots", "cdots"}
_OPERATORS = {"=", "+", "-", "*", "/", "^", "<", ">", "\\cdot", "\\times", "\\div"}
_BRACKETS = {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}


def _lex(text: str) -> list[tuple[str, str]]:
    """(kind, token) for prose with inline math; kinds: math, word (one letter, decided later), sep, ws, break."""
    out = []
    for m in _LEX.finditer(text):
        kind, tok = m.lastgroup, m[0]
        if kind == "text":  # \text{ cm} is prose; \text{(C)} and \mathrm{e} are math
            kind = "break" if re.search(r"[A-Za-z]{2}", tok[tok.index("{"):]) else "math"
        elif kind == "cmd":
            kind = "break" if tok[1:] in _PROSE_CMDS else "math"
        elif kind == "word":
            low = tok.lower()
            kind = ("sep" if low in ("and", "or") else "math" if low in _WORD_MATH
                    else "word" if len(tok) == 1 else "break")
        elif kind in ("num", "op", "matrix"):
            kind = "math"
        elif kind == "other":
            kind = "break"
        if tok == "!" and re.match(r"\s*(?:$|[A-Z\n])", text[m.end():]):
            kind = "break"  # "the answer is 5!" is an exclamation, "5! = 120" a factorial
        out.append((kind, tok))
    return out


def _items(text: str) -> list[tuple[str, str]]:
    """Math spans as single `math` items, the prose around them lexed; lone letters resolved to math or prose."""
    items, pos = [], 0
    for m in _SPAN.finditer(text):
        items += _lex(text[pos:m.start()]) + [("math", " " + next(g for g in m.groups() if g) + " ")]
        pos = m.end()
    items += _lex(text[pos:])
    return [("math" if _letter_is_math(items, i) else "break", tok) if kind == "word" else (kind, tok)
            for i, (kind, tok) in enumerate(items)]


def _letter_is_math(items: list[tuple[str, str]], i: int) -> bool:
    """A lone letter is a variable when it touches math (`2x`, `(C)`) or has an operator beside it (`x = 5`):
    "a" in "is a 5" and "I" in "I get 4" are prose."""
    for step in (-1, 1):
        j = i + step
        while 0 <= j < len(items) and items[j][0] == "ws":
            j += step
        if 0 <= j < len(items):
            kind, tok = items[j]
            touching = abs(j - i) == 1
            if (touching and kind in ("math", "word")) or tok.strip() in _OPERATORS or (
                    step == -1 and kind == "math" and (tok[:1] == "\\" or tok in _WORD_MATH)):  # \cot x, \pi r
                return True
    return False


def _answers(items: list[tuple[str, str]]) -> list[list[str]]:
    """The answers in reading order, each a list of parts (runs joined by `,`, and, or)."""
    answers: list[list[str]] = []
    parts: list[str] = []
    run: list[str] = []
    for kind, tok in items + [("break", "")]:
        if kind == "math" or (kind == "sep" and tok == "," and sum(_BRACKETS.get(c, 0) for c in "".join(run)) > 0):
            run.append(tok)  # a comma inside brackets belongs to the run: (1, 2), [0, 1)
        elif kind == "ws":
            if run:
                run.append(" ")
        else:
            part = _trim("".join(run))
            if part:
                parts.append(part)
            run = []
            if kind == "break" and parts:
                answers.append(parts)
                parts = []
    return answers


def _trim(s: str) -> str:
    """A run without dangling brackets or operators at its ends; empty when it holds no number, letter or command."""
    prev = None
    while s != prev:
        prev, s = s, s.strip().strip("=,+*/^").rstrip("-").strip()
        depth = sum(_BRACKETS.get(c, 0) for c in s)
        if s[-1:] in ("(", "[", "{") or (s[-1:] in (")", "]", "}") and depth < 0):
            s = s[:-1]
        elif s[:1] in (")", "]", "}") or (s[:1] in ("(", "[", "{") and depth > 0):
            s = s[1:]
    return s if re.search(r"[\w\\]", s) else ""


def _final_side(part: str, gold_is_equation: bool) -> str:
    """The value an equation arrives at: `3 + 4 = 7`, `x = 3 + 4 = 7`, `\\angle ABC = 40^\\circ`, `f(2) = 7` answer
    their last side when it is a constant, `y = 2x + 1` stays an equation; for a gold that is an equation only
    arithmetic (`3 + 4 = 7`) and chains are cut."""
    sides = _split_top(part, "=")
    if len(sides) < 2:
        return part
    if len(sides) > 2 or not _letters(sides[0]):
        return sides[-1]
    if not gold_is_equation and (not _letters(sides[-1]) or re.fullmatch(r"[A-Za-z](?:_\{?\w+\}?)?\s*(?:\([^()]*\))?",
                                                                         sides[0])):
        return sides[-1]
    return part


def _letters(s: str) -> bool:
    """Whether s names a variable (LaTeX commands such as \\sqrt, \\pi, \\circ do not count)."""
    return bool(re.search(r"[A-Za-z]", re.sub(r"\\[a-zA-Z]+", "", s)))


def extract_lenient(text: str, gold_is_equation: bool = False) -> str | None:
    """The final answer of a free-form response (see the section comment): boxed and `####` answers as in strict
    mode, else the first math after the last "answer is"/"answer:", else the last math of the text. An equation
    is read as the value it arrives at (`_final_side`)."""
    strict = extract_answer(text) if "\\boxed" in text or "\\fbox" in text or "####" in text else None
    if strict:  # an empty \boxed{} states nothing: read on
        return strict
    text = _THINK.sub("", text).split("<think>")[0]
    text = _UNICODE_RE.sub(lambda m: _UNICODE[m[0]], text)
    text = _BOLD.sub(r" \1 ", re.sub(r"(?<=\d)(?:\{,\}|,\\!\s*)(?=\d)", ",", text))  # 1{,}000, 1,\!000
    text = re.sub(r"(?<=\d)\s*(?:percent|per cent)\b", "%", text, flags=re.I)
    text = re.sub(r"(?<![\d.,])\d{1,3}(?: \d{3})+(?![\d,-]|\.\d)", lambda m: m[0].replace(" ", ""), text)  # 1 000 000
    chosen = None
    for m in reversed(list(_ANCHOR.finditer(text))):
        lines = [ln for ln in text[m.end():].split("\n", 3) if ln.strip(" \t*:")]  # "Answer:\n\n$42$" too
        got = _answers(_items(lines[0])) if lines else []
        if got:
            chosen = got[0]
            break
    if chosen is None:
        answers = [a for a in _answers(_items(text)) if not re.fullmatch(r"\s*[A-Za-z]\s*", " ".join(a))]
        chosen = answers[-1] if answers else None
    if chosen is None:
        return None
    return ", ".join(_final_side(part, gold_is_equation) for part in chosen)


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
    s = _UNICODE_RE.sub(lambda m: _UNICODE[m[0]], s)
    s = s.strip().strip("$").strip()
    s = re.sub(r"(?<=\d)\{,\}(?=\d)|,\\!\s*", ",", s)  # 1{,}000 and 10,\!080 are thousands separators
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?=[\\()\[\]|.{}])", "", s)
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "")
    s = re.sub(r"(?<!\\)\\ ", " ", s)  # a `\ ` space, not the `\\` of a matrix row followed by a space
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


def _item(s: str):
    """One element of a set, tuple or `or` list: an expression, or `x = expr` (a variable's value is the element)."""
    from dspost.rewards.math_parse import to_sympy  # sympy loads in the scoring workers only

    lhs, eq, rhs = s.partition("=")
    return to_sympy(rhs if eq and re.fullmatch(r"\s*[a-zA-Z]\s*", lhs) else s)


def _set_items(parts: list[str]) -> tuple:
    """Elements of a set; `a \\pm b` is two of them."""
    out = []
    for p in filter(None, parts):
        a, pm, b = p.partition("\\pm")
        if pm:
            a = a.strip() or "0"
            out += [_item(f"{a}+({b})"), _item(f"{a}-({b})")]
        else:
            out.append(_item(p))
    return tuple(out)


def parse_value(s: str) -> Value:
    import sympy

    from dspost.rewards.math_parse import MAX_LENGTH, Refused, to_sympy  # sympy loads in the scoring workers only

    s = normalise(s)
    if not s:
        raise ValueError("empty answer")
    if len(s) > MAX_LENGTH:
        raise Refused(f"answer longer than {MAX_LENGTH} characters")
    m = re.match(r"^\\begin\{[pbv]?matrix\}(.*)\\end\{[pbv]?matrix\}$", s, re.S)
    if m:
        rows = [[to_sympy(c.strip()) for c in r.split("&")] for r in m[1].strip().split("\\\\") if r.strip()]
        if len({len(r) for r in rows}) != 1:
            raise ValueError("ragged matrix")
        return Value("matrix", (sympy.Matrix(rows),), _is_inexact(s))
    if s.startswith("\\{") and s.endswith("\\}"):
        return Value("set", _set_items(_split_top(s[2:-2])), _is_inexact(s))
    if re.search(r"\s(?:or|and)\s", s):
        return Value("set", _set_items(re.split(r"\s(?:or|and)\s", s)), _is_inexact(s))
    if "\\cup" in s or (s[:1] in "([" and s[-1:] in ")]" and ("oo" in s or "infty" in s or s[0] + s[-1] in ("[)", "(]", "[]"))):
        return Value("interval", (_interval(s),), _is_inexact(s))
    if s[:1] == "(" and s[-1:] == ")" and len(_split_top(s[1:-1])) > 1:
        return Value("tuple", tuple(_item(p) for p in _split_top(s[1:-1])), _is_inexact(s))
    if ("," in s and len(_split_top(s)) > 1) or "\\pm" in s:
        return Value("set", _set_items(_split_top(s)), _is_inexact(s))
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        return Value("eq", (to_sympy(lhs), to_sympy(rhs)), _is_inexact(s))
    return Value("expr", (to_sympy(s),), _is_inexact(s))


def _interval(s: str):
    from dspost.rewards.math_parse import to_sympy  # sympy loads in the scoring workers only

    import sympy

    parts = [p.strip() for p in s.split("\\cup")]
    out = sympy.EmptySet
    for p in parts:
        if p[:1] not in "([" or p[-1:] not in ")]":
            raise ValueError(f"not an interval: {p}")
        lo, hi = _split_top(p[1:-1])
        lo, hi = (to_sympy(x.replace("\\infty", "oo")) for x in (lo, hi))
        out = out | sympy.Interval(lo, hi, left_open=p[0] == "(", right_open=p[-1] == ")")
    return out


# ------------------------------------------------------------------------------------------ equality
def _expr_equal(a, b, tol: float | None) -> bool:
    """a == b exactly (tol None) or within a relative tol. Numeric looks come first: `simplify` costs 1-20 ms an
    answer, and a difference that is non-zero as a number, or at a point, is never simplified to 0."""
    import sympy

    if a == b:
        return True
    try:
        diff = a - b
    except (TypeError, ValueError, AttributeError):
        return False
    if diff.free_symbols:
        at_points = _equal_at_points(diff)
        return at_points if at_points is not None else _simplifies_to_zero(diff)
    if not diff.is_Number and not _numerically_different(a, b, diff) and _simplifies_to_zero(diff):
        return True
    if diff == 0:
        return True
    if tol is not None:
        try:
            fa, fb = complex(sympy.N(a, 30)), complex(sympy.N(b, 30))
        except (TypeError, ValueError):
            return False
        return abs(fa - fb) <= tol * max(abs(fa), abs(fb), 1e-12)
    return False


def _simplifies_to_zero(diff) -> bool:
    import sympy

    try:
        return sympy.simplify(diff) == 0
    except (TypeError, ValueError, AttributeError):
        return False


def _numerically_different(a, b, diff) -> bool:
    """Constant a, b whose difference at 30 digits is beyond rounding: unequal without asking simplify."""
    import sympy

    try:
        d, na, nb = (abs(sympy.N(x, 30)) for x in (diff, a, b))
        return bool(d.is_Number and na.is_Number and nb.is_Number and d > max(na, nb) * sympy.Rational(1, 10 ** 20))
    except (TypeError, ValueError, AttributeError):
        return False


def _equal_at_points(diff, points: int = 4) -> bool | None:
    """Expressions simplify misses (sqrt(1/n) vs 1/sqrt(n)): zero at several fixed positive points.
    None when the difference cannot be evaluated there."""
    import random

    import sympy

    rng = random.Random(0)
    syms = sorted(diff.free_symbols, key=str)
    for _ in range(points):
        at = {x: sympy.Rational(rng.randint(11, 37), 10) for x in syms}
        try:
            v = complex(diff.subs(at).evalf(30))
        except (TypeError, ValueError, ZeroDivisionError):
            return None
        if v != v:  # nan: undefined at this point
            return None
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
        d1 = p.items[0] - p.items[1]
        d2 = g.items[0] - g.items[1]
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


def verify_math(response: str, gold: str, *, extraction: str = "strict", allow_last_number: bool = False,
                rel_tol: float = 1e-4, extract: bool = True) -> Verdict:
    """Grade a model response against a gold answer (a bare answer, a `\\boxed{}` solution, or GSM8K `#### N`).

    `extraction="strict"` (RL rewards: stating the final answer is part of the task) reads a boxed, `####`,
    "final answer is"/"Answer:" or bold answer, and the last number only with `allow_last_number`.
    `extraction="lenient"` (grading other models' outputs) reads the final expression however it is written:
    see `extract_lenient`. `extract=False` grades `response` as the answer itself."""
    from dspost.rewards.math_parse import Refused  # sympy loads in the scoring workers only

    if extraction not in ("strict", "lenient"):
        raise ValueError(f"verify_math: extraction must be 'strict' or 'lenient', got {extraction!r}")
    if extraction == "lenient" and allow_last_number:
        raise ValueError("verify_math: allow_last_number applies to extraction='strict'; lenient reads the last "
                         "expression already")
    gold_s = gold_answer(gold)
    if not extract:
        pred = response
    elif extraction == "lenient":
        pred = extract_lenient(response, gold_is_equation="=" in gold_s)
    else:
        pred = extract_answer(response, allow_last_number)
    if pred is None:
        return Verdict(0.0, "unparsable", None, "no final answer found")
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
