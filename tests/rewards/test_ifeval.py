"""IFEval rows graded through if-verifiable: verdicts with the failed ids named, rows it cannot grade repeatably
counted as bad with their reason, and the same verdict every time."""

import json
import sys

import pytest

from dspost.config import DataSection
from dspost.data.loading import DataError, load_examples
from dspost.rewards.ifeval import MISSING, ifeval_reward

pytest.importorskip("if_verifiable")

LOWER = "change_case:english_lowercase"
ROWS = [  # IFEval's shape; the Hugging Face copy gives every row every kwargs key, null where unused
    {"key": 1, "prompt": "Describe a cat in lowercase, without commas.",
     "instruction_id_list": [LOWER, "punctuation:no_comma"], "kwargs": [{"num_words": None}, {}]},
    {"key": 2, "prompt": "Answer in JSON and end with 'Is there anything else I can help with?'",
     "instruction_id_list": ["detectable_format:json_format"], "kwargs": [{}]},
    {"key": 3, "prompt": "Write at most 5 words, then a P.S.",
     "instruction_id_list": ["length_constraints:number_words", "detectable_content:postscript"],
     "kwargs": [{"relation": "less than", "num_words": 6}, {"postscript_marker": "P.S."}]},
    {"key": 4, "prompt": "Quote your whole answer.", "instruction_id_list": ["startend:quotation"], "kwargs": [{}]},
]


def grade(response: str, row: dict, **options):
    return ifeval_reward(response, {"instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"],
                                    "prompt": row["prompt"]}, **options)


@pytest.mark.parametrize("row,response,score,failed", [
    (ROWS[0], "a small cat sleeps in the sun all afternoon and purrs when it wakes up.", 1.0, ""),
    (ROWS[0], "a small cat, asleep in the sun all afternoon, purrs when it wakes up.", 0.0, "punctuation:no_comma"),
    (ROWS[0], "A small cat, asleep in the sun all afternoon, purrs when it wakes up.", 0.0,
     f"{LOWER}; punctuation:no_comma"),
    (ROWS[1], '```json\n{"cat": "small"}\n```', 1.0, ""),
    (ROWS[1], 'The cat: {"cat": "small"}', 0.0, "detectable_format:json_format"),
    (ROWS[2], "Cat.\nP.S. Purrs.", 1.0, ""),
    (ROWS[2], "A cat sleeps all day long.\nP.S. It purrs.", 0.0, "length_constraints:number_words"),
    (ROWS[2], "A small cat.", 0.0, "detectable_content:postscript"),
    (ROWS[3], '"A cat."', 1.0, ""),
    (ROWS[3], "A cat.", 0.0, "startend:quotation"),
    (ROWS[3], "", 0.0, "every instruction (empty response)"),
])
def test_verdicts_name_the_failed_ids(row, response, score, failed):
    v = grade(response, row)
    assert (v.score, v.status) == (score, "correct" if score else "wrong")
    assert v.detail == (f"failed: {failed}" if failed else "")


def test_loose_forgives_a_preamble_line_and_partial_counts_instructions():
    sure = 'Sure, here it is:\n{"cat": "small"}'
    assert grade(sure, ROWS[1]).score == 0.0
    assert grade(sure, ROWS[1], strict=False).score == 1.0
    v = grade("A small cat.", ROWS[2], partial=True)
    assert v.score == 0.5 and v.status == "wrong"


def test_a_verdict_repeats():
    # langdetect (the case checks) is random unless seeded: unseeded, it calls "SUM IS 8" English ~70% of the time
    from langdetect import DetectorFactory

    DetectorFactory.seed = None  # as in a fresh worker process
    row = {"prompt": "Shout.", "instruction_id_list": ["change_case:english_capital"], "kwargs": [{}]}
    assert len({grade("SUM IS 8", row) for _ in range(30)}) == 1


@pytest.mark.parametrize("ids,kwargs,problem", [
    (["punctuation:no_semicolon"], [{}], "unknown IFEval instruction id 'punctuation:no_semicolon'"),
    (["length_constraints:number_words"], [{"num_words": 5, "relation": None}],
     "length_constraints:number_words: kwargs lack ['relation'] (if-verifiable would draw them at random)"),
    (["keywords:existence"], [{"keywords": []}],
     "keywords:existence: kwargs {'keywords': []} are unusable (if-verifiable replaces them at random)"),
    (["startend:end_checker"], [{"end_phrase": "Done", "num_words": 3}],
     "startend:end_checker: kwargs ['num_words'] are not arguments of this check"),
    (["punctuation:no_comma", "startend:quotation"], [{}], "kwargs is not a list of 2 objects"),
])
def test_rows_that_cannot_be_graded_repeatably_are_errors_naming_the_id(ids, kwargs, problem):
    v = ifeval_reward("a cat", {"instruction_id_list": ids, "kwargs": kwargs})
    assert v.status == "error" and problem in v.detail


def test_the_global_random_state_is_left_alone():
    import random

    random.seed(5)
    before = random.getstate()
    ifeval_reward("a cat", {"instruction_id_list": ["keywords:existence"], "kwargs": [{"keywords": []}]})
    assert random.getstate() == before


def _nltk_has(resource: str) -> bool:
    import nltk

    try:
        nltk.data.find(resource)
        return True
    except LookupError:
        return False


def write(tmp_path, rows) -> str:
    path = tmp_path / "ifeval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_loading_ifeval_rows_for_rl_counts_the_bad_ones(tmp_path):
    bad = [
        {"key": 5, "prompt": "Be brief.", "instruction_id_list": ["no_such:check"], "kwargs": [{}]},
        {"key": 6, "prompt": "Two sentences.", "instruction_id_list": ["length_constraints:number_sentences"],
         "kwargs": [{"num_sentences": 2, "relation": "less than"}]},
        {"key": 7, "prompt": "Some words.", "instruction_id_list": ["length_constraints:number_words"],
         "kwargs": [{"num_words": None, "relation": "less than"}]},
        {"key": 8, "prompt": "No list.", "instruction_id_list": "punctuation:no_comma", "kwargs": [{}]},
    ]
    data = DataSection(path=write(tmp_path, ROWS + bad), num_eval=1, max_bad_fraction=1.0)
    train, held_out, report = load_examples(data, need_targets=False)
    assert [ex.row for ex in train + held_out] == [0, 1, 2, 3]
    ex = train[0]
    assert ex.messages == [{"role": "user", "content": ROWS[0]["prompt"]}, {"role": "assistant", "content": ""}]
    assert not ex.target and ex.answer is None
    assert ex.extra["instruction_id_list"] == ROWS[0]["instruction_id_list"] and ex.extra["kwargs"] == ROWS[0]["kwargs"]
    assert ifeval_reward("the cat sleeps in the sun all day.", {"answer": ex.answer, **ex.extra}).status == "correct"  # as reward terms call it
    reasons = dict(report.reasons)
    assert reasons.pop("unknown IFEval instruction id 'no_such:check'") == 1
    assert reasons.pop("length_constraints:number_words: kwargs lack ['num_words'] "
                       "(if-verifiable would draw them at random)") == 1
    assert reasons.pop("instruction_id_list is not a list of strings") == 1
    if _nltk_has("tokenizers/punkt_tab/english/"):
        assert [ex.row for ex in train + held_out][-1] == 5
    else:  # as on these machines: the check needs NLTK data that is not installed
        (reason, n), = reasons.items()
        assert n == 1 and reason.startswith("length_constraints:number_sentences: if-verifiable cannot check this "
                                            "(LookupError: Resource 'punkt")


def test_sft_refuses_ifeval_rows_for_want_of_an_answer(tmp_path):
    with pytest.raises(DataError, match=r"4/4 rows are bad .*: no answer to train on \(ifeval rows are prompts "
                                        r"for RL stages\) \(4 rows, first at row 0 of .*ifeval.jsonl \(line 1\)"):
        load_examples(DataSection(path=write(tmp_path, ROWS), num_eval=1))


def test_without_the_package_the_reward_and_the_loader_say_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "if_verifiable.ifeval.instructions_registry", None)  # import fails
    v = ifeval_reward("a cat", {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]})
    assert (v.status, v.detail) == ("error", MISSING) and "pip install 'dspost[ifeval]'" in MISSING
    with pytest.raises(DataError, match=r"data.format=ifeval: IFEval checks need the if-verifiable package"):
        load_examples(DataSection(path=write(tmp_path, ROWS), num_eval=1), need_targets=False)


def test_ifeval_reward_through_the_scoring_pool():
    from dspost.rewards import ScoringPool

    row = {"instruction_id_list": ["change_case:english_capital"], "kwargs": [{}]}
    with ScoringPool(1) as pool:
        verdicts = pool.map("dspost.rewards.ifeval:ifeval_reward", [("SUM IS 8", row), ("Sum is 8", row)], 30.0)
    assert [v.status for v in verdicts] == ["correct", "wrong"]
