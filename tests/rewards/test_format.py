"""The format reward: thinking structure, boxed answer and length limits, each configurable."""

import pytest

from dspost.rewards.registry import format_reward

GOOD = "<think>3 + 4 is 7.</think> The answer is \\boxed{7}."


@pytest.mark.parametrize("response,options,score,detail", [
    (GOOD, {}, 1.0, ""),
    ("The answer is \\boxed{7}.", {}, 1.0, ""),  # thinking optional by default
    ("The answer is \\boxed{7}.", {"think": "required"}, 0.0, "no <think> block"),
    (GOOD, {"think": "forbidden"}, 0.0, "<think> block not allowed"),
    ("<think>still thinking... \\boxed{7}", {}, 0.0, "unclosed or empty <think> block"),
    ("<think> </think> \\boxed{7}", {"think": "required"}, 0.0, "unclosed or empty <think> block"),
    ("<think>7</think>", {}, 0.0, "no answer after the thinking"),
    ("<think>\\boxed{7}</think> The answer is 7.", {}, 0.0, "no \\boxed{} answer"),  # boxed only in the thinking
    ("<think>7</think> The answer is 7.", {"boxed": False}, 1.0, ""),
    (GOOD, {"max_chars": 10}, 0.0, "answer longer than 10 characters"),
    (GOOD, {"min_chars": 100}, 0.0, "answer shorter than 100 characters"),
    (GOOD, {"min_chars": 5, "max_chars": 40}, 1.0, ""),
])
def test_format_reward(response, options, score, detail):
    v = format_reward(response, {}, **options)
    assert v.score == score and v.status == ("correct" if score else "wrong")
    assert detail in v.detail


def test_format_reward_names_a_bad_option():
    v = format_reward(GOOD, {}, think="sometimes")
    assert v.status == "error" and "think='sometimes'" in v.detail


def test_format_reward_through_the_scoring_pool():
    from dspost.rewards import ScoringPool, resolve

    with ScoringPool(1) as pool:
        verdicts = pool.map(resolve("format"), [(GOOD, {}), ("no box", {})], 5.0, {"think": "optional"})
    assert [v.score for v in verdicts] == [1.0, 0.0]
