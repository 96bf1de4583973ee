"""The synthetic instruction-following domain's constraint checks: each one passing and failing, failures named,
unusable ids and kwargs refused, and the checks held against IFEval's (if-verifiable) where both define one."""

import random

import pytest

from dspost.rewards.constraints import MAX_JSON_CHARS, check_constraints, instruct_reward

END, START = {"word": "Done"}, {"word": "Answer"}


@pytest.mark.parametrize("iid,kwargs,good,bad,reason", [
    ("caps", {}, "THE ANSWER IS 72.", "THE ANSWER is 72.", "has lowercase letters"),
    ("caps", {}, "ANSWER: 72", "72", "has no letters"),
    ("lowercase", {}, "so, the answer is 72.", "So, the answer is 72.", "has capital letters"),
    ("lowercase", {}, "answer: 7", "7.", "has no letters"),
    ("json_answer", {}, ' {"answer": 72}\n', '{"answer": "72"}', '"answer" is not an integer'),
    ("json_answer", {}, '{"answer": -3}', '{"answer": true}', '"answer" is not an integer'),
    ("json_answer", {}, '{"answer": 72}', '{"answer": 72.0}', '"answer" is not an integer'),
    ("json_answer", {}, '{"answer": 72}', '{"answer": 72, "why": "max"}', 'is not a JSON object with the one key "answer"'),
    ("json_answer", {}, '{"answer": 72}', '[72]', 'is not a JSON object with the one key "answer"'),
    ("json_answer", {}, '{"answer": 72}', '{"answer": 1, "answer": 72}', "is not JSON (or repeats a key)"),
    ("json_answer", {}, '{"answer": 72}', 'The answer is {"answer": 72}', "is not JSON (or repeats a key)"),
    ("json_answer", {}, '{"answer": 72}', "[" * 700 + "]" * 700,
     "longer than 1024 characters, not parsed as JSON"),
    ("end_word", END, "So, the answer is 72. Done  \n", "So, the answer is 72. Done.", "does not end with the word 'Done'"),
    ("end_word", END, "THE ANSWER IS 72. DONE", "The answer is 72. Undone", "does not end with the word 'Done'"),
    ("end_word", END, "done", "Done with it", "does not end with the word 'Done'"),
    ("start_word", START, "  Answer: 72.", "The answer is 72.", "does not start with the word 'Answer'"),
    ("start_word", START, "answer 72", "Answers: 72", "does not start with the word 'Answer'"),
    ("max_words", {"n": 4}, "The answer is 72.", "So, the answer is 72.", "has 5 words, more than 4"),
    ("max_words", {"n": 1}, "72.", "72 .5", "has 2 words, more than 1"),
    ("no_commas", {}, "So the answer is 72.", "So, the answer is 72.", "has a comma"),
    ("quoted", {}, '  "So, the answer is 72."\n', '"So, the answer is 72.', "is not wrapped in double quotes"),
    ("quoted", {}, '""', '"', "is not wrapped in double quotes"),
])
def test_each_constraint_passes_and_fails_with_its_reason(iid, kwargs, good, bad, reason):
    ok = check_constraints(good, [iid], [kwargs])
    assert (ok.score, ok.status, ok.detail) == (1.0, "correct", "")
    v = check_constraints(bad, [iid], [kwargs])
    assert (v.score, v.status) == (0.0, "wrong")
    assert v.detail == f"failed: {iid} ({reason})"


def test_the_json_cap_refuses_a_long_answer_that_would_parse():
    padded = '{"answer":' + " " * MAX_JSON_CHARS + "72}"
    assert check_constraints(padded.replace(" " * MAX_JSON_CHARS, " "), ["json_answer"], [{}]).score == 1.0
    v = check_constraints(padded, ["json_answer"], [{}])
    assert v.score == 0.0 and f"longer than {MAX_JSON_CHARS} characters" in v.detail


def test_every_failed_constraint_is_named_and_no_other():
    ids = ["caps", "no_commas", "end_word", "max_words"]
    kwargs = [{}, {}, END, {"n": 3}]
    v = check_constraints("SO, THE ANSWER IS 72. DONE", ids, kwargs)
    assert v.score == 0.0 and v.status == "wrong"
    assert v.detail == "failed: no_commas (has a comma); max_words (has 6 words, more than 3)"
    part = check_constraints("SO, THE ANSWER IS 72. DONE", ids, kwargs, partial=True)
    assert part.score == 0.5 and part.detail == v.detail


def test_an_empty_response_follows_no_constraint():
    v = check_constraints("  \n", ["no_commas", "max_words"], [{}, {"n": 3}], partial=True)
    assert v.score == 0.0 and v.detail == "failed: no_commas (empty response); max_words (empty response)"


@pytest.mark.parametrize("ids,kwargs,problem", [
    (["caps", "shout"], [{}, {}], "unknown instruction id 'shout'"),
    (["punctuation:no_comma"], [{}], "unknown instruction id 'punctuation:no_comma'"),
    ([], [], "instruction_id_list is empty"),
    ("caps", [{}], "instruction_id_list is not a list of strings"),
    (["caps", "no_commas"], [{}], "kwargs is not a list of 2 objects"),
    (["end_word"], [{}], "end_word: kwargs [] are not ['word']"),
    (["end_word"], [{"word": "Done", "n": 3}], "end_word: kwargs ['n', 'word'] are not ['word']"),
    (["end_word"], [{"word": "Done now"}], "end_word: kwargs word='Done now' must be one word"),
    (["max_words"], [{"n": 0}], "max_words: kwargs n=0 must be an integer >= 1"),
    (["max_words"], [{"n": True}], "max_words: kwargs n=True must be an integer >= 1"),
    (["max_words"], [{"n": "5"}], "max_words: kwargs n='5' must be an integer >= 1"),
])
def test_ids_and_kwargs_that_cannot_be_checked_are_errors_naming_them(ids, kwargs, problem):
    v = check_constraints("ANSWER 72", ids, kwargs)
    assert v.status == "error" and v.score == 0.0 and problem in v.detail


def test_null_kwargs_are_absent_ones():
    # a columnar copy gives every row's kwargs every key of the column
    v = check_constraints("Answer: 72. Done", ["start_word", "end_word"], [{"word": "Answer", "n": None},
                                                                           {"word": "Done", "n": None}])
    assert v.status == "correct"


def test_instruct_reward_reads_the_example_and_can_require_the_answer():
    ex = {"instruction_id_list": ["start_word", "no_commas"], "kwargs": [START, {}], "answer": "72"}
    assert instruct_reward("Answer: 72.", ex).status == "correct"
    assert instruct_reward("Answer: 71.", ex).status == "correct"  # constraints only, by default
    wrong = instruct_reward("Answer: 71.", ex, check_answer=True)
    assert (wrong.score, wrong.extracted, wrong.detail) == (0.0, "71", "failed: answer (71 is not 72)")
    assert instruct_reward("Answer: 71.", ex, partial=True, check_answer=True).score == pytest.approx(2 / 3)
    right = instruct_reward("Answer: 72.", ex, check_answer=True)
    assert (right.score, right.extracted) == (1.0, "72")
    assert instruct_reward("x", {"answer": "1"}).status == "error"
    no_gold = instruct_reward("Answer: 72.", {k: v for k, v in ex.items() if k != "answer"}, check_answer=True)
    assert no_gold.status == "error" and "no gold answer" in no_gold.detail


def test_instruct_reward_through_the_scoring_pool():
    from dspost.rewards import ScoringPool

    ex = {"instruction_id_list": ["caps"], "kwargs": [{}], "answer": "7"}
    with ScoringPool(1) as pool:
        verdicts = pool.map("dspost.rewards.constraints:instruct_reward", [("ANSWER: 7", ex), ("answer: 7", ex)],
                            5.0, {"check_answer": True})
    assert [v.status for v in verdicts] == ["correct", "wrong"]


# ----------------------------------------------------------------------------- against IFEval's checks
def _responses(n: int = 400) -> list[str]:
    """Answers in the domain's forms, and near misses: trailing punctuation, stray quotes and commas, padding."""
    r = random.Random(0)
    heads = ["So, the answer is 72.", "Answer: 72.", "72", '{"answer": 72}', "the answer is 7 Done",
             "THE ANSWER IS 9. DONE", "So the answer is 72. Done", "done", "Undone", '"Answer: 3"']
    edits = [lambda s: s, lambda s: s + ".", lambda s: s + " ", lambda s: f'"{s}"', lambda s: f'"{s}',
             lambda s: s + '"', lambda s: s.replace(" ", ", ", 1), lambda s: " " + s + "\n", lambda s: s + " word",
             lambda s: s.rstrip(".") + " Done", lambda s: "```json\n" + s + "\n```", lambda s: s.upper()]
    return sorted({r.choice(edits)(r.choice(edits)(r.choice(heads))) for _ in range(n)})


def _ifeval(response: str, iid: str, kwargs: dict) -> bool:
    from if_verifiable.common import evaluate_instructions
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    results, scores = evaluate_instructions(response, [iid], [kwargs], "", INSTRUCTION_DICT)
    assert len(results) == 1 or not response.strip()
    return scores.binary_strict == 1.0


@pytest.mark.parametrize("ours,ours_kwargs,theirs,their_kwargs,same", [
    ("no_commas", {}, "punctuation:no_comma", {}, True),
    ("quoted", {}, "startend:quotation", {}, True),
    ("max_words", {"n": 3}, "length_constraints:number_words", {"relation": "less than", "num_words": 4}, True),
    ("max_words", {"n": 5}, "length_constraints:number_words", {"relation": "less than", "num_words": 6}, True),
    ("json_answer", {}, "detectable_format:json_format", {}, False),  # IFEval: any JSON, fences stripped
    ("end_word", END, "startend:end_checker", {"end_phrase": "Done"}, False),  # IFEval: no word boundary
])
def test_ours_agrees_with_ifeval_or_is_stricter(ours, ours_kwargs, theirs, their_kwargs, same):
    pytest.importorskip("if_verifiable")
    pairs = [(check_constraints(s, [ours], [ours_kwargs]).score == 1.0, _ifeval(s, theirs, their_kwargs), s)
             for s in _responses()]
    assert {a for a, _, _ in pairs} == {True, False}  # both verdicts occur: the comparison is not vacuous
    if same:
        assert [s for a, b, s in pairs if a != b] == []
    else:
        assert [s for a, b, s in pairs if a and not b] == []
        assert any(b and not a for a, b, _ in pairs)  # and stricter somewhere, as documented
