"""The synthetic instruction-following domain: a fixed held-out split, completions that meet their own
constraints, reproducible from the seed, and short enough for the tiny model."""

from collections import Counter

import pytest

from dspost.data import synthetic_instruct as si
from dspost.data.loading import DataError, synthetic_examples
from dspost.rewards.constraints import check_constraints, instruct_reward


@pytest.fixture(scope="module")
def problems():
    train, held_out = si.splits(3000, 300, 0)
    return train + held_out


def test_held_out_is_fixed_and_disjoint_from_train():
    train, held_out = si.splits(2000, 100, 7)
    assert not {p.question for p in train} & {p.question for p in held_out}
    assert len({p.question for p in train}) == len(train)
    # fixed: the same held-out set whatever the training set's size
    assert si.splits(50, 100, 7)[1] == held_out
    assert si.splits(2000, 100, 8)[1] != held_out


def test_generate_never_repeats_an_excluded_prompt():
    first = si.generate(40, 3)
    more = si.generate(80, 3, exclude={p.question for p in first})
    assert not {p.question for p in first} & {p.question for p in more}


def test_the_same_seed_gives_the_same_problems():
    assert si.generate(200, 11) == si.generate(200, 11)
    assert si.generate(200, 11) != si.generate(200, 12)


def test_every_worked_completion_meets_its_own_constraints(problems):
    for p in problems:
        v = check_constraints(p.solution, list(p.instruction_id_list), list(p.kwargs))
        assert v.status == "correct", (p.question, p.solution, v.detail)
        assert p.solution.count(p.answer) >= 1


def test_every_constraint_and_every_compatible_pair_is_drawn_and_no_incompatible_one(problems):
    ids = Counter(i for p in problems for i in p.instruction_id_list)
    assert set(ids) == set(si.INSTRUCTION_IDS) and min(ids.values()) > 200
    pairs = {frozenset(p.instruction_id_list) for p in problems if len(p.instruction_id_list) == 2}
    compatible = {frozenset((a, b)) for a in si.INSTRUCTION_IDS for b in si.INSTRUCTION_IDS if a < b} - si.INCOMPATIBLE
    assert pairs == compatible
    assert all(len(set(p.instruction_id_list)) == len(p.instruction_id_list) for p in problems)


def test_the_prompt_asks_for_what_is_checked(problems):
    for p in problems:
        for iid, kw in zip(p.instruction_id_list, p.kwargs):
            assert si.PROMPTS[iid].format(**kw) in p.question
    shortened = [p for p in problems if "max_words" in p.instruction_id_list and "json_answer" not in
                 p.instruction_id_list and " the answer is " not in p.solution.lower()]
    assert shortened  # some word limits are tight enough to force the short answer


def test_prompts_and_completions_fit_the_tiny_model(problems):
    from dspost.data.synthetic_math import corpus
    from dspost.model import build_tokenizer, tiny_math

    tok = build_tokenizer(corpus(), tiny_math().vocab_size)  # the tiny-math checkpoint's tokenizer
    completions = tok([p.solution for p in problems])["input_ids"]
    assert max(len(c) for c in completions) + 1 <= 40  # + the end token, within rollout.max_tokens 48
    prompts = tok.apply_chat_template([si.messages(p, with_solution=False) for p in problems], tokenize=True,
                                      add_generation_prompt=True, return_dict=True)["input_ids"]
    assert max(len(p) for p in prompts) <= 128  # data.max_seq_len 256


def test_examples_carry_what_the_reward_reads():
    train, held_out = synthetic_examples("instruct", 30, 10, 0, [1, 2])
    assert (len(train), len(held_out)) == (30, 10)
    for ex in train + held_out:
        assert ex.target and ex.messages[-1]["role"] == "assistant"
        example = {"answer": ex.answer, **ex.extra}  # as the reward terms build it
        assert instruct_reward(ex.messages[-1]["content"], example, check_answer=True).status == "correct"
        assert instruct_reward("", example).status == "wrong"


def test_unknown_levels_and_domains_are_one_line_errors():
    with pytest.raises(ValueError, match=r"math levels \[1, 2\], not \[3\]"):
        si.splits(10, 5, 0, [3])
    with pytest.raises(DataError, match="unknown synthetic domain 'poetry'"):
        synthetic_examples("poetry", 10, 5, 0, [1])
