"""Verifiable output constraints of the synthetic instruction-following domain ("answer in capital letters",
"end with the word Done", "at most N words", ...), checked by small pure functions.

Rows are IFEval-shaped (`instruction_id_list`, `kwargs`) under our own ids. We check these ourselves instead of
through IFEval's code because its case checks also require `langdetect` to say "en", which it said for 0% of
short numeric answers ("42", "ANSWER: 17") and 66% of short all-caps ones: right for the benchmark's long
answers, noise as a reward for a 4-layer model. Where an IFEval check exists the definitions coincide
(`no_commas`, `quoted`, `max_words`) or ours is the stricter one (`json_answer`, `end_word`): the tests hold
both against `if-verifiable`. Model outputs are hostile input: nothing is evaluated, JSON is parsed only up to
`MAX_JSON_CHARS`."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from dspost.rewards.verdict import Verdict

MAX_JSON_CHARS = 1024
_WORD = re.compile(r"\w+")  # IFEval's `count_words` tokenizer (nltk RegexpTokenizer(r"\w+"))
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _caps(s: str) -> str | None:
    # str.isupper: every cased character upper case and at least one of them ("42" alone is no answer in capitals)
    return None if s.isupper() else "has lowercase letters" if any(c.islower() for c in s) else "has no letters"


def _lowercase(s: str) -> str | None:
    return None if s.islower() else "has capital letters" if any(c.isupper() for c in s) else "has no letters"


def _json_answer(s: str) -> str | None:
    t = s.strip()
    if len(t) > MAX_JSON_CHARS:
        return f"longer than {MAX_JSON_CHARS} characters, not parsed as JSON"
    try:
        value = json.loads(t, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError):  # RecursionError: ~1000 nested brackets fit in the cap
        return "is not JSON (or repeats a key)"
    if not isinstance(value, dict) or list(value) != ["answer"]:
        return 'is not a JSON object with the one key "answer"'
    if type(value["answer"]) is not int:  # noqa: E721 (a bool is an int subclass; 7.0 is no integer answer)
        return '"answer" is not an integer'
    return None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):  # plain json keeps the last of '{"answer": 1, "answer": 2}' silently
        raise ValueError("a key given twice")
    return d


def _end_word(s: str, word: str) -> str | None:
    # Nothing may follow the word, not even a period: IFEval's end_checker refuses "Done." too. Case-insensitive
    # as IFEval's, so that it combines with `caps` and `lowercase`.
    t = s.rstrip()
    head = t[: len(t) - len(word)]
    ok = t.lower().endswith(word.lower()) and not (head and _WORD.fullmatch(head[-1]))
    return None if ok else f"does not end with the word {word!r}"


def _start_word(s: str, word: str) -> str | None:
    t = s.lstrip()
    rest = t[len(word):]
    ok = t.lower().startswith(word.lower()) and not (rest and _WORD.fullmatch(rest[0]))
    return None if ok else f"does not start with the word {word!r}"


def _max_words(s: str, n: int) -> str | None:
    count = len(_WORD.findall(s))
    return None if count <= n else f"has {count} words, more than {n}"


def _no_commas(s: str) -> str | None:
    return None if "," not in s else "has a comma"


def _quoted(s: str) -> str | None:
    t = s.strip()
    return None if len(t) >= 2 and t[0] == t[-1] == '"' else "is not wrapped in double quotes"


def _word(v: Any) -> str | None:
    return None if isinstance(v, str) and _WORD.fullmatch(v) else "must be one word"


def _positive_int(v: Any) -> str | None:
    return None if type(v) is int and v >= 1 else "must be an integer >= 1"  # noqa: E721


class Constraint(NamedTuple):
    check: Callable[..., str | None]  # check(response, **kwargs): why the response fails, or None
    args: dict[str, Callable[[Any], str | None]]  # kwarg -> why a value is unusable, or None


CONSTRAINTS: Mapping[str, Constraint] = MappingProxyType({
    "caps": Constraint(_caps, {}),
    "lowercase": Constraint(_lowercase, {}),
    "json_answer": Constraint(_json_answer, {}),
    "end_word": Constraint(_end_word, {"word": _word}),
    "start_word": Constraint(_start_word, {"word": _word}),
    "max_words": Constraint(_max_words, {"n": _positive_int}),
    "no_commas": Constraint(_no_commas, {}),
    "quoted": Constraint(_quoted, {}),
})


def shape_problem(instruction_ids: Any, kwargs: Any) -> str | None:
    """Why `instruction_id_list` and `kwargs` are not IFEval's shape (a non-empty list of ids, one kwargs object
    per id), or None."""
    if not isinstance(instruction_ids, list) or not all(isinstance(i, str) for i in instruction_ids):
        return "instruction_id_list is not a list of strings"
    if not instruction_ids:
        return "instruction_id_list is empty"
    if not isinstance(kwargs, list) or len(kwargs) != len(instruction_ids) or not all(
            isinstance(k, dict) for k in kwargs):
        return f"kwargs is not a list of {len(instruction_ids)} objects, one per instruction id"
    return None


def constraint_problem(instruction_ids: Any, kwargs: Any) -> str | None:
    """Why these ids and kwargs cannot be checked (an unknown id, a missing or bad argument), or None. Keys with
    a null value are not arguments: columnar formats give every row's kwargs every key seen in the column."""
    if problem := shape_problem(instruction_ids, kwargs):
        return problem
    for iid, kw in zip(instruction_ids, kwargs):
        if iid not in CONSTRAINTS:
            return f"unknown instruction id {iid!r} (known: {', '.join(CONSTRAINTS)})"
        spec = CONSTRAINTS[iid].args
        given = {k: v for k, v in kw.items() if v is not None}
        if set(given) != set(spec):
            return f"{iid}: kwargs {sorted(given)} are not {sorted(spec)}"
        for key, valid in spec.items():
            if problem := valid(given[key]):
                return f"{iid}: kwargs {key}={given[key]!r} {problem}"
    return None


def check_constraints(response: str, instruction_ids: list[str], kwargs: list[dict[str, Any]],
                      partial: bool = False) -> Verdict:
    """1 when the response meets every constraint, else 0 (`partial`: the fraction met); `detail` names each
    failed id with what is wrong. Ids or kwargs that cannot be checked are an `error`: the data's fault, not the
    response's."""
    if problem := constraint_problem(instruction_ids, kwargs):
        return Verdict(0.0, "error", None, problem)
    return _verdict(_failures(response, instruction_ids, kwargs), len(instruction_ids), partial)


def _failures(response: str, instruction_ids: list[str], kwargs: list[dict[str, Any]]) -> list[str]:
    empty = not response.strip()  # follows no instruction, not even "no commas" (IFEval scores it 0 too)
    failed = []
    for iid, kw in zip(instruction_ids, kwargs):
        given = {k: v for k, v in kw.items() if v is not None}
        reason = "empty response" if empty else CONSTRAINTS[iid].check(response, **given)
        if reason:
            failed.append(f"{iid} ({reason})")
    return failed


def _verdict(failed: list[str], total: int, partial: bool, extracted: str | None = None) -> Verdict:
    score = (total - len(failed)) / total if partial else float(not failed)
    return Verdict(score, "wrong" if failed else "correct", extracted, "failed: " + "; ".join(failed) if failed else "")


def last_number(response: str) -> str | None:
    found = _NUMBER.findall(response)
    return found[-1] if found else None


def instruct_reward(response: str, example: dict, partial: bool = False, check_answer: bool = False) -> Verdict:
    """The reward of the synthetic instruction-following domain: `check_constraints` on the example's
    `instruction_id_list` and `kwargs`. `check_answer` also requires the last number in the response to be the
    example's gold `answer`, as one more requirement (following the form with the wrong number then fails)."""
    ids, kwargs = example.get("instruction_id_list"), example.get("kwargs")
    if ids is None or kwargs is None:
        return Verdict(0.0, "error", None, "example has no instruction_id_list or kwargs")
    if not check_answer:
        return check_constraints(response, ids, kwargs, partial)
    if problem := constraint_problem(ids, kwargs):
        return Verdict(0.0, "error", None, problem)
    if example.get("answer") is None:
        return Verdict(0.0, "error", None, "check_answer: example has no gold answer")
    failed = _failures(response, ids, kwargs)
    got, gold = last_number(response), str(example["answer"]).strip()
    if got != gold:
        failed.append(f"answer ({'no number' if got is None else got} is not {gold})")
    return _verdict(failed, len(ids) + 1, partial, got)
