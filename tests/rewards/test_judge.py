"""A generative judge served by a real vLLM engine (the shared tiny engine: its verdicts are noise, so this
checks the plumbing: both orders asked, verdicts parsed or counted unparsable, position statistics, and
greedy judging repeating exactly)."""

import pytest

from dspost.rewards.critics import Pair, VLLMJudge
from dspost.rewards.judging import pair_metrics

pytestmark = pytest.mark.vllm


def test_vllm_judge_asks_both_orders(vllm_engine):
    from dspost.data.synthetic_math import corpus
    from dspost.model import build_tokenizer

    tok = build_tokenizer(corpus(), 1024)  # the served checkpoint's vocabulary size
    pairs = [Pair("What is 2 + 2?", "4", "5"), Pair("Which is larger, 7 or 9?", "9", "7"),
             Pair("What is 3 x 3?", "9", "6")]
    judge = VLLMJudge(vllm_engine, tok, max_tokens=8)
    judgments = judge.compare(pairs)
    assert len(judgments) == 3 and all(j.orders is not None and len(j.orders) == 2 for j in judgments)
    metrics = pair_metrics(pairs, judgments)
    unparsable = sum(o is None for j in judgments for o in j.orders)
    assert metrics["position_bias"]["unparsable"] == unparsable == judge.unparsable
    assert metrics["failed"] == sum(j.orders == (None, None) for j in judgments)
    assert judge.compare(pairs) == judgments  # greedy: the same verdicts again


def test_vllm_judge_does_not_truncate_long_prompts(vllm_engine):
    from dspost.data.synthetic_math import corpus
    from dspost.model import build_tokenizer

    tok = build_tokenizer(corpus(), 1024)
    pairs = [Pair("What is 2 + 2?", "4", "5"), Pair("Explain. " * 100, "a", "b")]
    judge = VLLMJudge(vllm_engine, tok, max_tokens=4, max_prompt_tokens=300)
    judgments = judge.compare(pairs)
    assert judge.too_long == 2  # the long pair, in both orders
    assert judgments[1].preference is None and judgments[1].orders == (None, None)
