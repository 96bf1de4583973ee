"""The math verifier against the regression corpus (tests/rewards/math_corpus.jsonl, ~230 cases)."""

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
