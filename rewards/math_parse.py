"""LaTeX / plain-text math to sympy, without evaluating any text: a whitelist tokenizer feeding a small
precedence-climbing parser that calls sympy constructors directly.

Model outputs are hostile: sympy's `parse_expr` (and `sympify` of a string) runs Python `eval` with builtins,
so `\\boxed{__import__('os').mkdir('x')}` executes. Here a string never reaches `eval`, `exec`, `parse_expr` or
`sympify`: the tokenizer admits numbers, operators, brackets, letters and a fixed set of LaTeX commands and
raises on anything else, and each token becomes an sympy object through a constructor (`Integer(int(digits))`,
`Symbol(letters)`, `sin(arg)`, ...). Symbol names are plain letters, optionally with a letter/digit subscript.

Grammar (Python's precedence, with implicit multiplication as sympy's `implicit_multiplication_application`
read it, so the strict verifier keeps its verdicts):

    expr    := term (('+' | '-') term)*
    term    := factor (('*' | '/' | implicit) factor | '%')*      # '%' divides by 100
    factor  := ('-' | '+') factor | power
    power   := postfix ('^' factor)?                              # right-associative
    postfix := atom ('!' | '_' subscript)*
    atom    := number | letters | constant | '(' expr ')' | '{' expr '}' | \\frac A A | \\sqrt[n] A
             | \\binom A A | function ('^' factor)? (group | implicit product) | \\log_b ...

A LaTeX argument A is a brace group or one token (`\\frac12` is 1/2, `\\sqrt23` is sqrt(2)*3). Words of several
letters are products of one-letter symbols (`xy` is x*y) unless they name a function, pi, oo or a Greek letter.
Two bare numbers side by side (`1 000`, `2 3`) are refused rather than multiplied.

Number literals are exact (`0.5` is 1/2); whether an answer was written as a decimal, and so is compared with a
tolerance, is decided from its text in math.py. Sizes are checked before sympy evaluates: a power, factorial or
binomial whose result would exceed 10^10000 raises `Refused` (each is evaluated as it is built, so nothing larger
is ever computed).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import sympy


class Refused(ValueError):
    """An expression too large to evaluate safely (exponent tower, huge power, factorial or number)."""


MAX_DIGITS = 10_000  # results beyond 10^10000 are refused: exact arithmetic on them costs seconds
MAX_FACTORIAL = 5_000  # 5000! has 16,326 digits and takes ~1 ms; 100000! takes seconds
MAX_DEPTH = 60  # nesting of brackets, signs and exponents; deeper input is refused, not a RecursionError
MAX_LENGTH = 4_000  # characters of one answer (a 10x10 matrix of fractions is ~1,000); longer is refused

_FUNCS: dict[str, Callable] = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec, "csc": sympy.csc,
    "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan, "asin": sympy.asin, "acos": sympy.acos,
    "atan": sympy.atan, "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh, "log": sympy.log,
    "ln": sympy.log, "exp": sympy.exp, "sqrt": sympy.sqrt,
}
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota",
          "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi",
          "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega"}
_CONSTS = {"pi": sympy.pi, "infty": sympy.oo, "oo": sympy.oo}
_NAMES = set(_FUNCS) | set(_GREEK) | set(_CONSTS)
_MUL_CMDS = {"cdot", "times", "ast"}
_FRAC_TOKENS = {("cmd", "\\frac"), ("cmd", "\\dfrac"), ("cmd", "\\tfrac")}

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)
  | (?P<cmd>\\(?:[a-zA-Z]+|[{}]))
  | (?P<name>[a-zA-Z]+)
  | (?P<op>\*\*|[-+*/^!%(){}_\[\]])
""", re.X)


def tokenize(s: str) -> list[tuple[str, str]]:
    """(kind, text) tokens; kinds num, cmd, name, op. Raises ValueError on any other character."""
    out, i = [], 0
    while i < len(s):
        m = _TOKEN.match(s, i)
        if m is None:
            raise ValueError(f"unexpected character {s[i]!r} at {i}")
        if m.lastgroup == "num" and out and out[-1][0] == "num" and out[-2:-1] not in ([("op", "_")], [("op", "^")]):
            raise ValueError(f"two numbers side by side at {i}")  # `1 000`, `2 3`, `1.2.3`; not `\log_2 8`, `\cos^3 20`
        if m.lastgroup == "name" and m[0] not in _NAMES:  # xy is x*y: one token per letter
            out += [("name", c) for c in m[0]]
        elif m.lastgroup != "ws":
            out.append((m.lastgroup, "^" if m[0] == "**" else m[0]))
        i = m.end()
    return out


# ------------------------------------------------------------------------------- guarded constructors
def _check_number(x):
    """Refuse exact numbers beyond 10^MAX_DIGITS (integer parts of a Rational)."""
    if isinstance(x, sympy.Rational) and max(abs(x.p), x.q).bit_length() > MAX_DIGITS * 3.33:
        raise Refused("number too large")
    return x


def _pow(base, exp):
    """base**exp, refusing results too large to compute (the magnitude estimated from log10 before sympy tries)."""
    if exp.is_Number and base.is_Number and base.is_finite and exp.is_finite and abs(base) not in (0, 1):
        if base.is_Rational:  # digits of the exact result: |exp| * (digits of p + digits of q)
            size = math.log10(abs(int(base.p))) + math.log10(int(base.q))
            if float(abs(exp)) * max(size, 0.3) > MAX_DIGITS:
                raise Refused("exponent tower" if abs(exp) > MAX_DIGITS else "power too large")
    elif exp.is_Number and exp.is_finite and abs(exp) > MAX_DIGITS:
        raise Refused("power too large")  # x^(2^100), sqrt(2)^(10^6): each later evalf or simplify would blow up
    return _check_number(sympy.Pow(base, exp))


def _factorial(n, double: bool = False):
    if n.is_Number and n.is_finite and abs(n) > MAX_FACTORIAL:
        raise Refused("factorial too large")
    return _check_number(sympy.factorial2(n) if double else sympy.factorial(n))


def _binomial(n, k):
    if n.is_Integer and k.is_Integer and abs(n) > MAX_FACTORIAL and min(abs(k), abs(n - k)) > 100:
        raise Refused("binomial too large")
    return _check_number(sympy.binomial(n, k))


def _in_base(digits: str, base: str):
    """`52_8` is 52 in base 8 (MATH writes answers in other bases this way)."""
    if not base.isdigit() or not 2 <= int(base) <= 36:
        raise ValueError(f"base {base!r} is not an integer from 2 to 36")
    return sympy.Integer(int(digits, int(base)))  # int() raises if a digit is not valid in that base


def _number(text: str):
    """The exact value of a number literal: `12`, `0.5` (1/2), `.5`, `1e3`, `2.5e-3`, built from its digits."""
    m = re.fullmatch(r"(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?", text)
    whole, frac, exp = m[1], m[2] or "", int(m[3] or 0)
    if len(whole) + len(frac) > MAX_DIGITS or abs(exp) > MAX_DIGITS:
        raise Refused("number too large")
    value = sympy.Rational(int(whole + frac or "0"), 10 ** len(frac))
    return value * sympy.Integer(10) ** exp if exp else value


# ---------------------------------------------------------------------------------------------- parser
class _Parser:
    """One pass over the tokens; each method consumes what it parses and returns a sympy object."""

    def __init__(self, tokens: list[tuple[str, str]]):
        self.toks = tokens
        self.i = 0
        self.depth = 0

    # token helpers
    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise ValueError("unexpected end of expression")
        self.i += 1
        return tok

    def accept(self, text: str) -> bool:
        tok = self.peek()
        if tok is not None and tok[1] == text and tok[0] in ("op", "cmd"):
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> None:
        if not self.accept(text):
            raise ValueError(f"expected {text!r} at token {self.i}")

    def starts_atom(self) -> bool:
        tok = self.peek()
        if tok is None:
            return False
        kind, text = tok
        if kind in ("num", "name"):
            return True
        if kind == "cmd":
            return text not in ("\\}",) and text[1:] not in _MUL_CMDS | {"div"}
        return text in ("(", "{")

    # grammar
    def parse(self):
        out = self.expr()
        if self.peek() is not None:
            raise ValueError(f"unexpected {self.peek()[1]!r} at token {self.i}")
        return out

    def expr(self):
        out = self.term()
        while True:
            if self.accept("+"):
                out = _check_number(out + self.term())
            elif self.accept("-"):
                out = _check_number(out - self.term())
            else:
                return out

    def term(self):
        out = self.factor()
        while True:
            tok = self.peek()
            if tok is None:
                return out
            kind, text = tok
            if text == "*" or (kind == "cmd" and text[1:] in _MUL_CMDS):
                self.i += 1
                out = _check_number(out * self.factor())
            elif text == "/" or text == "\\div":
                self.i += 1
                out = _check_number(out / self.factor())
            elif text == "%" and kind == "op":
                self.i += 1
                out = out / 100
            elif self.starts_atom():
                out = _check_number(out * self.power())
            else:
                return out

    def enter(self) -> None:
        """Count one level of recursion (signs in `factor`, everything else in `atom`) and bound it."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ValueError("expression nested too deeply")

    def factor(self):
        self.enter()
        if self.accept("-"):
            out = -self.factor()
        elif self.accept("+"):
            out = self.factor()
        else:
            out = self.power()
        self.depth -= 1
        return out

    def power(self):
        base = self.postfix()
        if self.accept("^"):
            return _pow(base, self.factor())
        return base

    def postfix(self):
        tok = self.peek()
        out = self.atom()
        if tok is not None and tok[0] == "num" and tok[1].isdigit():
            if self.peek() == ("op", "_"):
                self.i += 1
                out = _in_base(tok[1], self.subscript())
            elif self.peek() in _FRAC_TOKENS:
                out = self.mixed_number(out)
        while True:
            if self.accept("!"):
                if self.accept("!"):
                    out = _factorial(out, double=True)
                else:
                    out = _factorial(out)
            elif self.peek() == ("op", "_") and isinstance(out, sympy.Symbol):
                self.i += 1
                out = sympy.Symbol(f"{out.name}_{self.subscript()}")
            else:
                return out

    def mixed_number(self, whole):
        """`1\\frac{4}{5}` is 9/5, as MATH writes mixed numbers; `2\\frac{x}{3}` stays a product."""
        start = self.i
        frac = self.atom()
        if all(kind == "num" and text.isdigit() or text in "{}" for kind, text in self.toks[start + 1: self.i]):
            return whole + frac
        return whole * frac

    def subscript(self) -> str:
        """The text of `_1`, `_n`, `_{n+1}`: it becomes part of a symbol's name (or a number's base)."""
        if self.accept("{"):
            parts, depth = [], 1
            while True:
                kind, text = self.take()
                depth += {"{": 1, "}": -1}.get(text, 0) if kind == "op" else 0
                if depth == 0:
                    return "".join(parts)
                parts.append(text)
        kind, text = self.take()
        if kind not in ("num", "name"):
            raise ValueError(f"subscript expected at token {self.i - 1}")
        if len(text) > 1:  # x_12 subscripts the 1 only, as LaTeX does
            self.toks[self.i - 1: self.i] = [(kind, text[0]), (kind, text[1:])]
        return text[0]

    def group(self, close: str):
        out = self.expr()
        self.expect(close)
        return out

    def atom(self):
        self.enter()
        kind, text = self.take()
        if kind == "num":
            out = _number(text)
        elif kind == "name":
            out = self.word(text)
        elif kind == "cmd":
            out = self.command(text[1:])
        elif text in ("(", "{"):
            out = self.group(")" if text == "(" else "}")
        else:
            raise ValueError(f"unexpected {text!r} at token {self.i - 1}")
        self.depth -= 1
        return out

    def word(self, text: str):
        if text in _CONSTS:
            return _CONSTS[text]
        if text in _FUNCS:
            return self.function(_FUNCS[text])
        return sympy.Symbol(text)  # one letter, or a Greek letter's name

    def command(self, name: str):
        if name in ("{", "}"):  # \{ and \} group like parentheses, as before
            if name == "}":
                raise ValueError("unbalanced \\}")
            return self.group("\\}")
        if name in _CONSTS:
            return _CONSTS[name]
        if name in ("frac", "dfrac", "tfrac", "cfrac"):
            num = self.argument()
            return _check_number(num / self.argument())
        if name in ("binom", "dbinom", "tbinom"):
            n = self.argument()
            return _binomial(n, self.argument())
        if name == "sqrt":
            if self.accept("["):
                index = self.expr()
                self.expect("]")
                return _pow(self.argument(), 1 / index)
            return sympy.sqrt(self.argument())
        if name == "log" and self.peek() == ("op", "_"):
            self.i += 1
            base = self.argument()
            return self.function(lambda x: sympy.log(x, base))
        if name in _FUNCS:
            return self.function(_FUNCS[name])
        if name in _GREEK:
            return sympy.Symbol(name)
        raise ValueError(f"unsupported LaTeX command \\{name}")

    def argument(self):
        """A LaTeX argument: a brace group, a parenthesised group, or one token (one digit of a number)."""
        tok = self.peek()
        if tok is None:
            raise ValueError("missing argument")
        kind, text = tok
        if kind in ("num", "name") and len(text) > 1:
            self.toks[self.i: self.i + 1] = [(kind, text[0]), (kind, text[1:])]
        if text in ("{", "("):
            self.i += 1
            return self.group("}" if text == "{" else ")")
        if kind == "op":
            raise ValueError(f"missing argument at token {self.i}")
        return self.atom()

    def function(self, fn: Callable):
        """`\\sin(x)`, `\\sin x`, `\\sin^2 x`, `\\sin 2x`: the argument is a group, or the implicit product that
        follows up to an operator or the next function (`\\sin x \\cos x` is sin(x)*cos(x))."""
        exponent = self.factor() if self.accept("^") else None
        tok = self.peek()
        if tok in (("op", "("), ("op", "{")):
            self.i += 1
            arg = self.group(")" if tok[1] == "(" else "}")
        else:
            if not self.starts_atom():
                raise ValueError(f"function without an argument at token {self.i}")
            arg = self.power()
            while self.starts_atom() and not self.at_function():
                arg = _check_number(arg * self.power())
        out = fn(arg)
        return out if exponent is None else _pow(out, exponent)

    def at_function(self) -> bool:
        kind, text = self.peek()
        return (kind == "name" and text in _FUNCS) or (kind == "cmd" and text[1:] in _FUNCS)


def to_sympy(s: str):
    """Parse one expression (no commas, relations or `=`; `Value` in math.py handles structure) to sympy."""
    if len(s) > MAX_LENGTH:
        raise Refused(f"answer longer than {MAX_LENGTH} characters")
    return _Parser(tokenize(s)).parse()
