"""Real IFEval rows graded by Google's reference checks as packaged in `if-verifiable` (pinned 0.1.2, the
`ifeval` extra), rather than by a re-implementation of the benchmark.

The package is used with three guards, each for a measured fault: (1) an unknown instruction id is skipped by it silently
(score 0, nothing checked), and a missing or unusable argument (`num_words: null`, `keywords: []`) makes it
draw one with the global `random`: such rows are refused, naming the id; (2) `langdetect` (the case and language
checks) is unseeded and disagreed with itself on 5 of 300 short strings between runs: it is seeded before every
check (`DetectorFactory.seed = 0`), so a verdict repeats, as exact resume needs; (3) two checks need NLTK data the
package does not ship and that cannot be downloaded here (`length_constraints:number_sentences`,
`change_case:capital_word_frequency`): `ifeval_problem(..., probe=True)` runs each check once on a probe text so
that the loader counts such rows as bad with the reason, on any machine whose NLTK data is missing. It is
imported only when used: its `import` pulls `datasets` (1.4 s here)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from dspost.rewards.constraints import shape_problem
from dspost.rewards.verdict import Verdict

MISSING = "IFEval checks need the if-verifiable package: pip install 'dspost[ifeval]'"
_PROBE = "A probe sentence, checked once at load."


def registry() -> Mapping[str, type]:
    """if-verifiable's IFEval checker classes by instruction id; ImportError when the package is missing."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return INSTRUCTION_DICT


def _first_line(e: BaseException) -> str:
    """The first line of an error that says something (nltk's LookupError opens with a row of asterisks)."""
    return next((ln.strip() for ln in str(e).splitlines() if any(c.isalnum() for c in ln)), type(e).__name__)


def _draws_at_random(checker: Any, given: dict[str, Any]) -> bool:
    """Whether building the check from `given` draws from the global `random` (it does for a missing argument
    and for some unusable ones: an empty keyword list, `nth_paragraph` past `num_paragraphs`): any draw moves
    the generator's state. The state is restored either way."""
    state = random.getstate()
    try:
        checker.build_description(**given)
        return random.getstate() != state
    finally:
        random.setstate(state)


def ifeval_problem(instruction_ids: Any, kwargs: Any, checkers: Mapping[str, type], probe: bool = False) -> str | None:
    """Why a row's ids and kwargs cannot be graded repeatably, or None. Null-valued kwargs are absent ones
    (the Hugging Face copy of IFEval gives every row every key). `probe`: also run each check once, which
    finds the checks this machine cannot run (missing NLTK data)."""
    if problem := shape_problem(instruction_ids, kwargs):
        return problem
    for iid, kw in zip(instruction_ids, kwargs):
        if iid not in checkers:
            return f"unknown IFEval instruction id {iid!r}"
        checker = checkers[iid](iid)
        given = {k: v for k, v in kw.items() if v is not None}
        keys = set(checker.get_instruction_args_keys())
        if set(given) - keys:
            return f"{iid}: kwargs {sorted(set(given) - keys)} are not arguments of this check"
        if keys - set(given):
            return f"{iid}: kwargs lack {sorted(keys - set(given))} (if-verifiable would draw them at random)"
        try:
            if _draws_at_random(checker, given):
                return f"{iid}: kwargs {given} are unusable (if-verifiable replaces them at random)"
            if probe:
                checker.check_following(_PROBE)
        except Exception as e:  # noqa: BLE001 (a third-party check: any failure is the reason the row is refused)
            return f"{iid}: if-verifiable cannot check this ({type(e).__name__}: {_first_line(e)})"
    return None


def ifeval_reward(response: str, example: dict, strict: bool = True, partial: bool = False) -> Verdict:
    """IFEval's verdict on the response for the example's `instruction_id_list` and `kwargs`: 1 when every
    instruction is followed (prompt-level; `partial`: the fraction followed, instruction-level), `strict` on
    the response as written, else `loose` (also accepted with the first or last line, or markdown asterisks,
    removed). `detail` names the failed ids."""
    try:
        checkers = registry()
        from if_verifiable.common import evaluate_instructions
        from langdetect import DetectorFactory
    except ImportError:
        return Verdict(0.0, "error", None, MISSING)
    ids, kwargs = example.get("instruction_id_list"), example.get("kwargs")
    if problem := ifeval_problem(ids, kwargs, checkers):
        return Verdict(0.0, "error", None, problem)
    DetectorFactory.seed = 0  # class attribute every Detector reads when made; set here, not once, so nothing resets it
    try:
        results, scores = evaluate_instructions(response, ids, kwargs, example.get("prompt") or "", checkers)
    except Exception as e:  # noqa: BLE001 (a third-party check failing on this response)
        return Verdict(0.0, "error", None, f"if-verifiable failed: {type(e).__name__}: {_first_line(e)}")
    if not results:  # an empty response (or only a <think> block): if-verifiable checks nothing and scores 0
        return Verdict(0.0, "wrong", None, "failed: every instruction (empty response)")
    failed = [r.instruction_id for r in results if not (r.strict_pass if strict else r.loose_pass)]
    score = (scores.partial_strict if strict else scores.partial_loose) if partial else float(not failed)
    return Verdict(score, "wrong" if failed else "correct", None, "failed: " + "; ".join(failed) if failed else "")
