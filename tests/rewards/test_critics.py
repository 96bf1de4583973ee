"""Critics, judgment statistics and the critic-of-critics on the shipped reference set."""

import math

import numpy as np
import pytest

from dspost.rewards import verify_math
from dspost.rewards.critics import (Critic, Judgment, LengthCritic, Pair, RuleCritic, make_critic,
                                    parse_verdict)
from dspost.rewards.judging import (bootstrap_ci, calibration, pair_metrics, sign_test_p, spearman,
                                    wilson_ci)
from dspost.rewards.meta_critic import apply_policy, assess, length_slope, load_reference


class MathPlusLength(Critic):
    """A planted bias: the math verifier's verdict plus 0.02 per character, so length outweighs
    correctness once two answers differ by more than 50 characters."""

    name = "math+length"

    def __init__(self):
        self.rule = RuleCritic("math")

    def score(self, prompts, responses, answers):
        return [s + 0.02 * len(r) for s, r in zip(self.rule.score(prompts, responses, answers), responses)]

    def close(self):
        self.rule.close()


@pytest.fixture(scope="module")
def reference():
    return load_reference()


def test_shipped_reference_set_is_sound(reference):
    slices = {p.category for p in reference}
    assert len(reference) >= 60 and len(slices) >= 5
    for name in slices:
        assert sum(p.category == name for p in reference) >= 10, name
    for p in reference:  # every gold label is checkable: chosen right, rejected wrong, except pure style pairs
        assert verify_math(p.chosen, p.answer).status == "correct", p
        both_right = p.category == "concise-correct vs verbose-correct"
        assert verify_math(p.rejected, p.answer).status == ("correct" if both_right else "wrong"), p
    longer = sum(len(p.chosen) > len(p.rejected) for p in reference)
    assert 0.2 < longer / len(reference) < 0.8  # gold is longer in some pairs and shorter in others


def test_planted_length_bias_is_flagged_and_corrected(reference):
    with MathPlusLength() as planted:
        report = assess(planted, reference)
        assert report["flagged"]
        assert report["length_bias"]["verdict"] == "prefers longer"
        # README: "flagged on two slices": the two where the gold answer is the shorter one
        assert report["biased_slices"] == ["concise-correct vs verbose-correct", "concise-correct vs verbose-wrong"]
        assert report["slices"]["verbose-correct vs concise-wrong"]["verdict"] == "trusted"

        corrected = apply_policy("correct", planted, report, reference).critic
        assert corrected.slope == pytest.approx(length_slope(planted, reference))
        after = assess(corrected, reference)
        assert not after["flagged"] and after["biased_slices"] == []
        assert after["length_bias"]["verdict"] == "no length bias detected"
        assert after["accuracy"] > report["accuracy"] + 0.3

        gated = apply_policy("gate", planted, report, reference, gate_weight=0.25)
        assert gated.weight_scale == 0.25 and gated.critic is planted
        assert apply_policy("report", planted, report, reference).weight_scale == 1.0


def test_unbiased_rule_critic_is_not_flagged(reference):
    with RuleCritic("math") as rule:
        report = assess(rule, reference)
    assert not report["flagged"]
    assert all(s["verdict"] != "biased" for s in report["slices"].values())
    assert report["slices"]["concise-correct vs verbose-correct"]["ties"] == 13  # it cannot tell them apart
    assert report["slices"]["format-only"]["verdict"] == "trusted"


def test_length_critic_is_the_length_baseline(reference):
    judgments = LengthCritic().compare(reference)
    metrics = pair_metrics(reference, judgments)
    assert metrics["accuracy"] == pytest.approx(metrics["length_bias"]["length_baseline_accuracy"])
    assert metrics["length_bias"]["acc_when_chosen_longer"] == 1.0
    assert metrics["length_bias"]["acc_when_chosen_shorter"] == 0.0
    assert metrics["length_bias"]["score_length_spearman"] == pytest.approx(1.0)
    assert metrics["failed"] == 0 and "position_bias" not in metrics


@pytest.mark.parametrize("text,expected", [
    ("Output (a)", "a"), ("output (B)", "b"), ("[[A]]", "a"), ("My verdict: [[B]]", "b"),
    ("<think>Output (a) looks long... but</think> Output (b)", "b"),
    ("Output (a) is accurate while Output (b) is not. Output (a)", "a"),
    ("Response B is better.", "b"), ("The better one is A.", "a"), ("b", "b"), ("(a)", "a"),
    ("Both outputs are fine.", None), ("", None), ("Output (a) and Output (b) are both wrong.", None),
    ("abracadabra", None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_statistics():
    x = np.array([1, 1, 0, 1, 0, 1, 1, 1], dtype=float)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)  # deterministic for a seed
    lo, hi = bootstrap_ci(x)
    assert lo <= x.mean() <= hi
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 2], [1, 2, 3, 4]) == pytest.approx(0.894427, abs=1e-5)  # ties averaged
    assert sign_test_p(10, 10) == pytest.approx(2 ** -10)
    assert sign_test_p(0, 0) == 1.0
    assert wilson_ci(13, 13)[0] == pytest.approx(0.772, abs=1e-3)
    assert all(math.isnan(v) for v in wilson_ci(0, 0))
    # A critic whose confidence matches its hit rate: 3 of 4 right at p = 0.75 (score gap log 3).
    gap = math.log(3)
    judgments = [Judgment(1, gap, 0.0)] * 3 + [Judgment(-1, 0.0, gap)]
    ece, bins = calibration(judgments)
    assert ece == pytest.approx(0.0, abs=1e-9) and bins[0]["n"] == 4


def test_failed_and_tied_judgments_count_as_wrong():
    pairs = [Pair("q", "a", "bb")] * 4
    judgments = [Judgment(1, 1.0, 0.0), Judgment(0, 1.0, 1.0), Judgment(None, detail="x"), Judgment(-1, 0.0, 1.0)]
    m = pair_metrics(pairs, judgments)
    assert m["accuracy"] == 0.25 and m["ties"] == 1 and m["failed"] == 1


def test_make_critic_refuses_unknown_specs(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        make_critic("no-such-critic")
    with pytest.raises(ValueError, match="no config.json"):
        make_critic(str(tmp_path))
    assert isinstance(make_critic("length"), LengthCritic)


def test_reference_loader_names_the_bad_line(tmp_path):
    bad = tmp_path / "ref.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "slice": "s"}\n{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(ValueError, match=r"ref.jsonl:2: missing or empty rejected, slice"):
        load_reference(bad)


@pytest.mark.parametrize("first,second,preference,orders", [
    ("a", "b", 1, (1, 1)),        # chosen picked in both orders
    ("b", "a", -1, (-1, -1)),     # rejected picked in both orders
    ("a", "a", 0, (1, -1)),       # always the first shown: position bias, a tie
    ("a", None, 1, (1, None)),    # one order unparsable: the other decides
    (None, None, None, (None, None)),
])
def test_judge_combines_both_orders(first, second, preference, orders):
    from dspost.rewards.critics import combine_orders

    j = combine_orders(first, second)
    assert (j.preference, j.orders) == (preference, orders)
