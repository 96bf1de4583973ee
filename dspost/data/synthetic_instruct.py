"""Synthetic instruction following: a level-1/2 math question plus one or two verifiable constraints.

"Which is larger, 72 or 15? Answer in capital letters. End your response with the word Done." ->
"SO, THE ANSWER IS 72. DONE". The math is what the tiny warm start already answers; the domain teaches the
form. Rows are IFEval-shaped (`instruction_id_list`, `kwargs`) under the ids of `dspost.rewards.constraints`,
which grades them; each worked completion meets its constraints by construction (the tests check every one).
Pairs that no response can meet together are never drawn (`INCOMPATIBLE`).

Sizes in the tiny-math tokenizer (byte-level BPE trained on math text only: English costs ~4x the tokens of a
general tokenizer; capitals, unseen in its corpus, a token per letter), over 5500 problems: prompts 31-86 tokens
with the chat template (median 56), against `data.max_seq_len` 256; completions 3-31 tokens with the end token
(median 12), against `rollout.max_tokens` 48; the longest is "SO, THE ANSWER IS 94. FINISHED". The longer
answer sentence of each kind is the one the tests hold to 40 tokens. Trained with `corpus()` in its texts, the
tokenizer halves both (prompts at most 36, completions at most 12). Train and held-out sets come from disjoint
seeds and share no prompt."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dspost.data import synthetic_math

EVAL_SEED_OFFSET = synthetic_math.EVAL_SEED_OFFSET
LEVELS = (1, 2)  # integer answers with a one-line question; what the warm start solves
END_WORDS = ("Done", "End", "Finished")
START_WORDS = ("Answer", "Result", "Solution")
MAX_WORDS_CAP = 8  # "at most N words" draws N up to this; the longest completion has 6 words
_WORD = re.compile(r"\w+")  # words as `max_words` counts them

PROMPTS = {
    "caps": "Answer in capital letters.",
    "lowercase": "Answer in lowercase letters only.",
    "json_answer": 'Give the answer as JSON {{"answer": N}}.',
    "end_word": "End your response with the word {word}.",
    "start_word": "Start your response with the word {word}.",
    "max_words": "Use at most {n} words.",
    "no_commas": "Do not use any commas.",
    "quoted": "Wrap your whole response in double quotes.",
}
INSTRUCTION_IDS = tuple(PROMPTS)
# Pairs no response meets (JSON has lowercase keys and must be the whole response; a quote cannot come first
# or last together with a required first or last word).
INCOMPATIBLE = frozenset(frozenset(p) for p in [
    ("caps", "lowercase"), ("caps", "json_answer"), ("json_answer", "start_word"), ("json_answer", "end_word"),
    ("json_answer", "quoted"), ("quoted", "start_word"), ("quoted", "end_word"),
])


@dataclass(frozen=True)
class Problem:
    question: str  # the whole prompt: the math question, then the constraints
    answer: str  # the math question's gold answer
    solution: str  # a completion that meets every constraint
    level: int
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]


def _draw_ids(r: random.Random) -> list[str]:
    first = r.choice(INSTRUCTION_IDS)
    if r.random() < 0.5:
        return [first]
    second = r.choice([i for i in INSTRUCTION_IDS if i != first and frozenset((first, i)) not in INCOMPATIBLE])
    return [first, second]


def _candidates(ids: list[str], kwargs: list[dict[str, Any]], answer: str) -> list[str]:
    """Completions before case and quotes, longest first; a case constraint needs a letter, so never the bare
    number."""
    kw = dict(zip(ids, kwargs))
    if "json_answer" in kw:
        return [f'{{"answer": {answer}}}']
    start, end = kw.get("start_word", {}).get("word"), kw.get("end_word", {}).get("word")
    comma = "" if "no_commas" in kw else ","
    if start:
        bodies = [f"{start}: the answer is {answer}.", f"{start}: {answer}."]
    else:
        bodies = [f"So{comma} the answer is {answer}.", f"Answer: {answer}."]
        bodies += [] if {"caps", "lowercase"} & set(kw) else [f"{answer}."]
    return [f"{b} {end}" if end else b for b in bodies]


def complete(ids: list[str], kwargs: list[dict[str, Any]], answer: str) -> str:
    """The worked completion: the longest candidate within `max_words`, in the asked-for case and quotes."""
    kw = dict(zip(ids, kwargs))
    limit = kw.get("max_words", {}).get("n", MAX_WORDS_CAP)
    fits = [c for c in _candidates(ids, kwargs, answer) if _words(c) <= limit]
    if not fits:
        raise ValueError(f"no completion of {ids} with {kwargs} fits")  # `_draw_kwargs` draws n from what fits
    text = fits[0].upper() if "caps" in kw else fits[0].lower() if "lowercase" in kw else fits[0]
    return f'"{text}"' if "quoted" in kw else text


def _words(s: str) -> int:
    return len(_WORD.findall(s))


def _draw_kwargs(r: random.Random, ids: list[str], answer: str) -> list[dict[str, Any]]:
    kwargs = [{"word": r.choice(END_WORDS)} if i == "end_word" else
              {"word": r.choice(START_WORDS)} if i == "start_word" else {} for i in ids]
    if "max_words" in ids:  # from the shortest completion's words up to the cap: a small N forces a short answer
        shortest = min(_words(c) for c in _candidates(ids, kwargs, answer))
        kwargs[ids.index("max_words")] = {"n": r.randint(shortest, MAX_WORDS_CAP)}
    return kwargs


def _problem(r: random.Random, levels: list[int]) -> Problem:
    math = synthetic_math.LEVELS[r.choice(levels)](r)
    ids = _draw_ids(r)
    kwargs = _draw_kwargs(r, ids, math.answer)
    asks = " ".join(PROMPTS[i].format(**k) for i, k in zip(ids, kwargs))
    return Problem(f"{math.question} {asks}", math.answer, complete(ids, kwargs, math.answer), math.level,
                   tuple(ids), tuple(kwargs))


def generate(n: int, seed: int, levels: Sequence[int] = LEVELS, exclude: set[str] = frozenset()) -> list[Problem]:
    """`n` problems with distinct prompts, none of them in `exclude`."""
    unknown = sorted(set(levels) - set(LEVELS))
    if unknown or not levels:
        raise ValueError(f"data.difficulty: instruction following draws from math levels {list(LEVELS)}, "
                         f"not {sorted(levels)}")
    r = random.Random(seed)
    out, seen = [], set(exclude)
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"data: only {len(out)} distinct instruction prompts exist at levels {levels}, asked for {n}")
        p = _problem(r, levels)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def splits(num_train: int, num_eval: int, seed: int, levels: Sequence[int] = LEVELS) -> tuple[list[Problem], list[Problem]]:
    """A fixed held-out split first (its own seeds), then training problems that never repeat a held-out prompt."""
    held_out = generate(num_eval, seed + EVAL_SEED_OFFSET, levels)
    train = generate(num_train, seed, levels, exclude={p.question for p in held_out})
    return train, held_out


def messages(p: Problem, with_solution: bool = True) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": p.question}]
    if with_solution:
        msgs.append({"role": "assistant", "content": p.solution})
    return msgs


def corpus(n: int = 2000, seed: int = 12345) -> list[str]:
    """Text for training the tokenizer along with `synthetic_math.corpus`: prompts and completions."""
    return [f"{p.question} {p.solution}" for p in generate(n, seed)]
