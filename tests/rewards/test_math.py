"""The math verifier: strict mode against the regression corpus (math_corpus.jsonl), hostile answers that must
never run, and lenient extraction against answers written any way (math_lenient_corpus.jsonl)."""

import json
from collections import Counter
from pathlib import Path

import pytest

from dspost.rewards import extract_answer, verify_math, verify_math_batch

CORPUS = [json.loads(line) for line in Path(__file__).with_name("math_corpus.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", CORPUS, ids=[f"{i}-{c['rule']}" for i, c in enumerate(CORPUS)])
def test_corpus_case(case):
    v = verify_math(case["response"], case["gold"])
    assert v.status == case["expected"], (case, v)
    assert v.score == (1.0 if case["expected"] == "correct" else 0.0)


def test_corpus_covers_every_rule_and_status():
    assert len(CORPUS) >= 200
    rules = Counter(c["rule"] for c in CORPUS)
    for rule in ("extract", "gsm8k", "numbers", "percent", "latex", "symbolic", "equation", "interval", "set",
                 "tuple", "matrix", "adversarial"):
        assert rules[rule] >= 5, rule
    assert {c["expected"] for c in CORPUS} == {"correct", "wrong", "unparsable", "error"}


def test_last_number_only_when_allowed():
    assert extract_answer("so we get 12 and then 15") is None
    assert extract_answer("so we get 12 and then 15", allow_last_number=True) == "15"
    assert verify_math("total 1,234 apples", "1234", allow_last_number=True).status == "correct"


def test_batch_is_ordered_and_bounded():
    pairs = [(c["response"], c["gold"]) for c in CORPUS[:40]]
    verdicts = verify_math_batch(pairs, timeout=10)
    assert [v.status for v in verdicts] == [c["expected"] for c in CORPUS[:40]]


# ------------------------------------------------------------------------------ model output is never run
@pytest.fixture
def no_eval(monkeypatch):
    """eval/exec of a string, and sympy's string parser, raise if anything on the verifier's path calls them
    (exec of code objects stays: that is how Python imports a module)."""
    import builtins

    import sympy.parsing.sympy_parser as sympy_parser
    import sympy.physics.units  # noqa: F401 - simplify imports it on first use, and it sympifies its own constants

    class EvalCalled(BaseException):  # not an Exception: the verifier's `except Exception` cannot swallow it
        pass

    def guard(real):
        def run(source, *args, **kwargs):
            if isinstance(source, (str, bytes)):
                raise EvalCalled(f"{real.__name__}({source!r})")
            return real(source, *args, **kwargs)
        return run

    def refuse(*args, **kwargs):
        raise EvalCalled(f"sympy string parser called with {args[:1]!r}")

    monkeypatch.setattr(builtins, "eval", guard(builtins.eval))
    monkeypatch.setattr(builtins, "exec", guard(builtins.exec))
    monkeypatch.setattr(sympy_parser, "parse_expr", refuse)
    monkeypatch.setattr(sympy_parser, "eval_expr", refuse)


HOSTILE = [
    "__import__('os').mkdir('{d}')", "__import__(\"os\").mkdir(\"{d}\")", "().__class__.__base__.__subclasses__()",
    "eval('1')", "exec('import os')", "open('/etc/passwd').read()", "open('{d}', 'w')", "lambda: 1",
    "(lambda x: x)(1)", "x.__class__", "getattr(x, '__class__')", "'abc'", "\"abc\"", "__builtins__",
    "x.real", "{'a': 1}", "[c for c in ()]", "__import__('shutil').rmtree('{d}')", "1; 2", "globals()['x']",
]


@pytest.mark.parametrize("answer", HOSTILE)
def test_hostile_answer_is_unparsable_and_never_run(answer, tmp_path, no_eval):
    target = tmp_path / "made_by_the_answer"
    answer = answer.replace("{d}", str(target))
    for extraction in ("strict", "lenient"):
        for response in (f"\\boxed{{{answer}}}", f"The final answer is ${answer}$."):
            v = verify_math(response, "1", extraction=extraction)
            assert v.status == "unparsable", (extraction, response, v)
        verify_math(answer, "1", extraction="lenient")  # prose: lenient may read a number from it, nothing more
    assert not target.exists()


def test_mkdir_answer_creates_nothing(tmp_path):
    """The reported exploit, without the eval guard: on 775a309 this created the directory."""
    target = tmp_path / "pwned"
    v = verify_math(f"\\boxed{{__import__('os').mkdir('{target}')}}", "1")
    assert not target.exists()
    assert v.status == "unparsable"


def test_corpus_grades_without_eval(no_eval):
    for case in CORPUS:
        assert verify_math(case["response"], case["gold"]).status == case["expected"], case


# ------------------------------------------------------------------------------------------ lenient mode
LENIENT = [json.loads(line) for line in
           Path(__file__).with_name("math_lenient_corpus.jsonl").read_text(encoding="utf-8").splitlines()]
# Measured (benchmarks/rewards.py): 100% on both splits, 0 false accepts; math-verify 0.9: 93.6% dev and 93.3%
# heldout, 1 false accept in each. The floor leaves room for a case or two per split, never for a false accept.
LENIENT_FLOOR = 0.99


@pytest.mark.parametrize("split", ["dev", "heldout"])
def test_lenient_corpus(split, no_eval):
    cases = [c for c in LENIENT if c["split"] == split]
    verdicts = [verify_math(c["response"], c["gold"], extraction="lenient") for c in cases]
    false_accepts = [c for c, v in zip(cases, verdicts) if v.status == "correct" and c["label"] == "wrong"]
    assert not false_accepts
    agree = sum((v.status == "correct") == (c["label"] == "correct") for c, v in zip(cases, verdicts))
    assert agree / len(cases) >= LENIENT_FLOOR, [(c, v) for c, v in zip(cases, verdicts)
                                                 if (v.status == "correct") != (c["label"] == "correct")]


def test_lenient_corpus_is_what_the_generator_makes(data_dir):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_lenient_corpus",
                                                  Path(__file__).with_name("make_lenient_corpus.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.build(data_dir) == LENIENT


@pytest.mark.parametrize("response,gold", [
    ("42", "42"), ("$\\frac12$", "0.5"), ("−7", "-7"), ("1{,}000", "1000"), ("$1\\,000$", "1000"),
    ("\\binom{5}{2}", "10"), ("The total is 1,234 apples.", "1234"), ("So we get $x = 5$.", "5"),
    ("Thus \\[3 + 4 = 7\\]", "7"), ("The roots are $1$, $2$, and $3$.", "3, 2, 1"), ("It is 12 (which is even).", "12"),
    ("Hence $\\angle ABC = 40^\\circ$.", "40"), ("Thus $\\$1,\\!234$ in all.", "1234"), ("\\[2 + 3 = 5\\]", "x = 5"),
])
def test_lenient_reads_bare_answers(response, gold):
    assert verify_math(response, gold, extraction="lenient").status == "correct"
    assert verify_math(response, gold).status == "unparsable"  # strict mode wants a stated answer


@pytest.mark.parametrize("response,gold", [
    ("We first get 42, but the answer is 43.", "42"), ("The answer is 41. Note that 42 is even.", "42"),
    ("We get 12, so the total is 15.", "12"), ("−7", "7"), ("$\\frac12$", "2"), ("The answer is 3 or 4.", "3"),
    ("So $x = 2$ and $x = 3$.", "2"), ("The answer is 5!", "120"), ("So $a + b = 10$.", "11"),
])
def test_lenient_never_grades_an_earlier_or_partial_answer(response, gold):
    assert verify_math(response, gold, extraction="lenient").status != "correct"


def test_extraction_is_checked():
    with pytest.raises(ValueError, match="extraction"):
        verify_math("42", "42", extraction="loose")
    with pytest.raises(ValueError, match="allow_last_number"):
        verify_math("42", "42", extraction="lenient", allow_last_number=True)


def test_last_number_respects_latex():
    assert extract_answer("so the ratio is \\frac12", allow_last_number=True) == "\\frac12"
    assert extract_answer("giving 2^{10} ways", allow_last_number=True) == "2^{10}"
    assert verify_math("so the ratio is \\frac{1}{2}", "1/2", allow_last_number=True).status == "correct"
    assert verify_math("so we have \\sqrt{2}", "2", allow_last_number=True).status == "wrong"


def test_batch_passes_extraction():
    verdicts = verify_math_batch([("The answer is 7.", "7"), ("7", "7")], timeout=10, extraction="lenient")
    assert [v.status for v in verdicts] == ["correct", "correct"]
