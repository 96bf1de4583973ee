"""Writes math_corpus.jsonl: (response, gold, expected status) cases for the math verifier.

Kept as code so each case's intent sits next to it; run `python tests/rewards/make_corpus.py` after editing."""

import json
from pathlib import Path

C, W, U, E = "correct", "wrong", "unparsable", "error"
B = lambda x: f"The answer is $\\boxed{{{x}}}$."  # noqa: E731

CASES = [
    # --- extraction
    ("extract", B("42"), "42", C), ("extract", "\\fbox{42}", "42", C),
    ("extract", "\\boxed{1} then \\boxed{2}", "2", C), ("extract", "\\boxed{1} then \\boxed{2}", "1", W),
    ("extract", "\\boxed{\\frac{1}{2}}", "1/2", C), ("extract", "\\boxed{{3}}", "3", C),
    ("extract", "<think>maybe \\boxed{5}</think> so \\boxed{6}", "6", C),
    ("extract", "<think>\\boxed{5}</think> The result is 6", "5", U),
    ("extract", "<think>still thinking \\boxed{5}", "5", U),
    ("extract", "The final answer is 17. I hope it is correct.", "17", C),
    ("extract", "Answer: 23", "23", C), ("extract", "answer: x = 4", "4", C),
    ("extract", "So the answer is **73**", "73", C), ("extract", "**73**", "73", C),
    ("extract", "It is 12 then 15", "15", U), ("extract", "no numbers here", "3", U),
    ("extract", "", "3", U), ("extract", "\\boxed{}", "3", U),
    ("extract", "#### 72", "72", C), ("extract", "steps\n#### 1,234", "1234", C),
    ("extract", "The answer is \\boxed{7}.\nWait, no.", "7", C),
    ("extract", "\\boxed{\\text{(B)}}", "B", C),
    # --- GSM8K-style gold
    ("gsm8k", B("72"), "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", C),
    ("gsm8k", B("71"), "#### 72", W), ("gsm8k", B("1,000"), "#### 1000", C),
    ("gsm8k", B("-5"), "#### -5", C), ("gsm8k", B("5"), "#### -5", W),
    ("gsm8k", B("18.0"), "#### 18", C), ("gsm8k", B("\\$18"), "#### 18", C),
    ("gsm8k", B("18 dollars"), "#### 18", C), ("gsm8k", B("3.5"), "#### 3.5", C),
    # --- fractions, decimals, tolerance
    ("numbers", B("\\frac{3}{4}"), "0.75", C), ("numbers", B("\\dfrac{3}{4}"), "\\frac34", C),
    ("numbers", B("\\tfrac{3}{4}"), "3/4", C), ("numbers", B("6/8"), "\\frac{3}{4}", C),
    ("numbers", B("0.333"), "\\frac{1}{3}", W), ("numbers", B("0.33333"), "\\frac{1}{3}", C),
    ("numbers", B("0.3333333"), "\\frac13", C), ("numbers", B("\\frac{1}{3}"), "\\frac{1}{4}", W),
    ("numbers", B("1.5"), "\\frac{3}{2}", C), ("numbers", B("-\\frac{1}{2}"), "-0.5", C),
    ("numbers", B("\\frac{-1}{2}"), "-\\frac12", C), ("numbers", B("2"), "2.0", C),
    ("numbers", B("2.01"), "2", W), ("numbers", B("1e3"), "1000", C),
    ("numbers", B("1.2\\times 10^{3}"), "1200", C), ("numbers", B("1.2 \\cdot 10^3"), "1200", C),
    ("numbers", B("10^{-2}"), "0.01", C), ("numbers", B("3.14"), "\\pi", W),
    ("numbers", B("3.14159265"), "\\pi", C), ("numbers", B("1000000"), "10^6", C),
    ("numbers", B("1,000,000"), "1000000", C), ("numbers", B("12,345.5"), "12345.5", C),
    ("numbers", B(".5"), "\\frac{1}{2}", C), ("numbers", B("0"), "0", C), ("numbers", B("-0"), "0", C),
    ("numbers", B("007"), "7", C), ("numbers", B("7"), "77", W),
    # --- percentages
    ("percent", B("50\\%"), "0.5", C), ("percent", B("50\\%"), "50", C), ("percent", B("50%"), "50", C),
    ("percent", B("25\\%"), "0.5", W), ("percent", B("12.5\\%"), "12.5", C), ("percent", B("0.5"), "50\\%", C),
    # --- LaTeX clean-up
    ("latex", B("\\left(\\frac{1}{2}\\right)"), "\\frac12", C), ("latex", B("\\text{5}"), "5", C),
    ("latex", B("90^\\circ"), "90", C), ("latex", B("90^{\\circ}"), "90", C), ("latex", B("90°"), "90", C),
    ("latex", B("\\$5"), "5", C), ("latex", B("5\\text{ cm}"), "5", C), ("latex", B("5 cm"), "5", C),
    ("latex", B("12 \\mbox{ inches}"), "12", C), ("latex", B("3 \\text{ hours}"), "3", C),
    ("latex", B("3\\,000"), "3000", C), ("latex", B("\\displaystyle\\frac{1}{2}"), "0.5", C),
    ("latex", B("5\\%"), "5\\%", C), ("latex", B("\\sqrt{4}"), "2", C), ("latex", B("\\sqrt2"), "\\sqrt{2}", C),
    ("latex", B("2\\sqrt{2}"), "\\sqrt{8}", C), ("latex", B("\\sqrt[3]{8}"), "2", C),
    ("latex", B("\\frac{\\sqrt{3}}{2}"), "\\frac{1}{2}\\sqrt3", C), ("latex", B("\\frac{\\sqrt{3}}{2}"), "\\frac{\\sqrt2}{2}", W),
    ("latex", B("\\pi"), "\\pi", C), ("latex", B("2\\pi"), "\\pi \\cdot 2", C), ("latex", B("\\frac{\\pi}{2}"), "\\pi/2", C),
    ("latex", B("\\pi r^2"), "r^2\\pi", C), ("latex", B("e^{2}"), "e^2", C),
    # --- symbolic expressions
    ("symbolic", B("x^2+2x+1"), "(x+1)^2", C), ("symbolic", B("x^2+2x+2"), "(x+1)^2", W),
    ("symbolic", B("2(x+1)"), "2x+2", C), ("symbolic", B("\\frac{x}{2}"), "0.5x", C),
    ("symbolic", B("a+b"), "b+a", C), ("symbolic", B("a-b"), "b-a", W),
    ("symbolic", B("\\frac{1}{\\sqrt{n}}"), "\\sqrt{\\frac{1}{n}}", C), ("symbolic", B("\\sin^2 x + \\cos^2 x"), "1", C),
    ("symbolic", B("\\log 8"), "3\\log 2", C), ("symbolic", B("\\ln(e)"), "1", W),
    ("symbolic", B("3x"), "x3", C), ("symbolic", B("xy"), "yx", C), ("symbolic", B("2^{10}"), "1024", C),
    ("symbolic", B("10!"), "3628800", C), ("symbolic", B("\\frac{10!}{9!}"), "10", C),
    # --- equations
    ("equation", B("x=5"), "5", C), ("equation", B("x = 5"), "x=5", C), ("equation", B("y=5"), "5", C),
    ("equation", B("x=6"), "5", W), ("equation", B("5"), "x=5", C), ("equation", B("y=2x+1"), "y = 1 + 2x", C),
    ("equation", B("2x+1-y=0"), "y=2x+1", C), ("equation", B("y=2x+2"), "y=2x+1", W),
    ("equation", B("3x-y+13=0"), "3x+4y+14=0", W), ("equation", B("x+y=3"), "3", W),
    ("equation", B("k=1"), "1", C),
    # --- intervals
    ("interval", B("(1,2]"), "(1,2]", C), ("interval", B("[1,2]"), "[1,2]", C), ("interval", B("[1,2)"), "[1,2]", W),
    ("interval", B("(1,2]"), "[1,2]", W), ("interval", B("(-\\infty, 3)"), "(-\\infty,3)", C),
    ("interval", B("(-\\infty, 3]"), "(-\\infty,3)", W), ("interval", B("[0, \\infty)"), "[0,\\infty)", C),
    ("interval", B("(-\\infty,1)\\cup(2,\\infty)"), "(-\\infty,1) \\cup (2,\\infty)", C),
    ("interval", B("(2,\\infty)\\cup(-\\infty,1)"), "(-\\infty,1) \\cup (2,\\infty)", C),
    ("interval", B("(-\\infty,1]\\cup(2,\\infty)"), "(-\\infty,1) \\cup (2,\\infty)", W),
    ("interval", B("x \\in [1,2]"), "[1,2]", C), ("interval", B("\\left[1, 2\\right)"), "[1,2)", C),
    ("interval", B("[\\frac12, 1]"), "[0.5,1]", C),
    # --- sets, tuples, or, pm
    ("set", B("\\{1,2,3\\}"), "\\{3,2,1\\}", C), ("set", B("\\{1,2\\}"), "\\{1,2,3\\}", W),
    ("set", B("1, 2, 3"), "3,1,2", C), ("set", B("1, 2"), "1,2,3", W), ("set", B("2 or 3"), "3, 2", C),
    ("set", B("2 or 4"), "3, 2", W), ("set", B("x=2 or x=3"), "2,3", C), ("set", B("\\pm 2"), "2,-2", C),
    ("set", B("\\pm 2"), "2", W), ("set", B("1\\pm\\sqrt{2}"), "1+\\sqrt2, 1-\\sqrt2", C),
    ("set", B("\\{5\\}"), "5", C), ("set", B("-2, 2"), "\\pm 2", C),
    ("tuple", B("(1,2)"), "(1,2)", C), ("tuple", B("(2,1)"), "(1,2)", W), ("tuple", B("(1, 2, 3)"), "(1,2,3)", C),
    ("tuple", B("(1,2)"), "(1,2,3)", W), ("tuple", B("(\\frac12, 3)"), "(0.5, 3)", C),
    ("tuple", B("(1,234)"), "(1,234)", C), ("tuple", B("(1,234)"), "1234", W),
    ("tuple", B("(3, -1)"), "(3,-1)", C), ("tuple", B("(x, y) = (1,2)"), "(1,2)", U),
    # --- matrices
    ("matrix", B("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"), "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", C),
    ("matrix", B("\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}"), "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", C),
    ("matrix", B("\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}"), "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", W),
    ("matrix", B("\\begin{pmatrix}1&2\\end{pmatrix}"), "\\begin{pmatrix}1\\\\2\\end{pmatrix}", W),
    ("matrix", B("\\begin{pmatrix}0.5\\\\1\\end{pmatrix}"), "\\begin{pmatrix}\\frac12\\\\1\\end{pmatrix}", C),
    ("matrix", B("\\begin{pmatrix}1&2\\\\3\\end{pmatrix}"), "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", U),
    # --- adversarial
    ("adversarial", B("1-\\frac{1}{e}"), "1+\\frac{1}{e}", W), ("adversarial", B("\\frac{1}{2004!}"), "\\frac{1}{2006!}", W),
    ("adversarial", B("\\frac{1}{2^{99}}"), "\\frac{1}{2^{98}}", W), ("adversarial", B("\\pm 2021"), "2021", W),
    ("adversarial", B("4\\sqrt(2)"), "4", W), ("adversarial", B("2^{2^{2^{100}}}"), "1", U),
    ("adversarial", B("10^{(5^{5^{5}})}"), "3", U), ("adversarial", B("9^{9^{9}}"), "1", U),
    ("adversarial", B("100000!"), "1", U), ("adversarial", B("2^{100000}"), "1", U),
    ("adversarial", B("10^{10^{10}}"), "1", U), ("adversarial", B("12345678901234567890"), "12345678901234567890", C),
    ("adversarial", B("\\frac{1}{0}"), "1", W), ("adversarial", B("0/0"), "1", W),
    ("adversarial", B("x"), "y", W), ("adversarial", B("\\frac{"), "1", U),
    ("adversarial", B("}{"), "1", U), ("adversarial", B("\\undefinedmacro{3}"), "3", U),
    ("adversarial", B("3"), "\\undefinedmacro{3}", E), ("adversarial", B("1"), "2^{2^{2^{100}}}", E),
    ("adversarial", B("\\infty"), "\\infty", C), ("adversarial", B("-\\infty"), "\\infty", W),
    ("adversarial", B("\\text{no solution}"), "\\text{No solution}", W),
    ("adversarial", B("5") + " or maybe \\boxed{6}", "6", C),
    ("adversarial", "I think \\boxed{5" , "5", U), ("adversarial", B("5.") , "5", C),
    ("adversarial", B("5,"), "5", C), ("adversarial", B("  5  "), "5", C),
    ("adversarial", B("1/2"), "1/3", W), ("adversarial", B("2/4"), "1/2", C),
    ("adversarial", B("\\frac{2}{4}"), "0.5", C), ("adversarial", B("0.4999999"), "0.5", C),
    ("adversarial", B("0.49"), "0.5", W), ("adversarial", B("1e-9"), "0", W), ("adversarial", B("10^{-9}"), "0", W),
]
# Integer facts in bulk: each right answer accepted, each off-by-one refused.
for a, b in [(3, 4), (12, 30), (99, 1), (250, 250), (7, 8), (64, 36), (15, 27), (41, 59), (8, 88), (123, 456)]:
    CASES.append(("bulk", B(str(a + b)), str(a + b), C))
    CASES.append(("bulk", B(str(a + b + 1)), str(a + b), W))
    CASES.append(("bulk", f"{a} + {b} = {a + b}\n#### {a + b}", f"#### {a + b}", C))

# Parser fixes (a whitelist parser replaced sympy's parse_expr, which ran eval on model output); each of these
# had another verdict before.
CASES += [
    ("parser", B("\\frac{9}{5}"), "1\\frac{4}{5}", C), ("parser", B("\\frac{4}{5}"), "1\\frac{4}{5}", W),  # mixed
    ("parser", B("137.5"), "137 \\frac{1}{2}", C),
    ("parser", B("42"), "52_8", C), ("parser", B("52"), "52_8", W), ("parser", B("555"), "4210_{5}", C),  # bases
    ("parser", B("\\begin{pmatrix}-\\frac13\\\\ \\frac23\\end{pmatrix}"),
     "\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}", C),
    ("parser", B("1+\\sqrt5, 1-\\sqrt5, -2"), "\\{1\\pm\\sqrt{5},-2\\}", C),
    ("parser", B("1+\\sqrt5, -2"), "\\{1\\pm\\sqrt{5},-2\\}", W),
    ("parser", B("−7"), "-7", C), ("parser", B("1{,}000"), "1000", C), ("parser", B("10,\\! 080"), "10080", C),
    ("parser", B("1 000"), "0", U), ("parser", B("2 3"), "6", U),  # digits side by side are not a product
    ("parser", B("y\\sqrt{x}"), "\\sqrt{x}y", C), ("parser", B("\\frac{x\\sqrt{3}}{2}"), "\\frac{\\sqrt3}{2}x", C),
    ("parser", B("\\log_2 8"), "3", C), ("parser", B("\\log_{2}8"), "4", W),
    ("parser", B("\\arcsin 1"), "\\frac{\\pi}{2}", C),
    ("parser", B("\\sin x \\cos x"), "\\frac{\\sin 2x}{2}", C), ("parser", B("\\alpha+\\beta"), "\\beta + \\alpha", C),
    ("parser", B("\\binom{5}{2}"), "10", C), ("parser", B("\\dbinom{5}{2}"), "11", W), ("parser", B("NS"), "SN", C),
    ("parser", B("x_{n+1}"), "x_{n+1}+0", C), ("parser", B("\\{x=2 \\pm 1\\}"), "1, 3", C),
]

if __name__ == "__main__":
    out = Path(__file__).with_name("math_corpus.jsonl")
    out.write_text("".join(json.dumps({"rule": r, "response": resp, "gold": g, "expected": e}) + "\n"
                           for r, resp, g, e in CASES))
    print(f"{len(CASES)} cases -> {out}")
