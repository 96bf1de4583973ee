"""Verifier benchmarks, side by side in one run.

1. Math: our `verify_math` (strict and lenient extraction) vs `math-verify` (`parse` + `verify`), one process,
   best of 3 passes, on
   - the regression corpus (tests/rewards/math_corpus.jsonl; truth: the corpus's expected verdict is `correct`),
   - the lenient corpus (tests/rewards/math_lenient_corpus.jsonl; un-boxed responses labelled by construction),
     its `dev` split (the lenient extraction was tuned on it) and its `heldout` split (it was not).
   Per verifier: accuracy (agreement with the truth), false accepts (a wrong answer graded correct), false
   rejects, answers/s, and throughput relative to math-verify. Targets: lenient at least math-verify's accuracy
   on the lenient corpus with zero false accepts, at >= 5x its answers/s; strict unchanged on the regression corpus.
2. Code: the sandbox on HumanEval's canonical solutions (every one must score 1), samples/s, sequential
   and through the scoring pool.

    python benchmarks/rewards.py [--humaneval ../shared/data/humaneval/HumanEval.jsonl.gz] [--skip-code]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from collections.abc import Callable
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests" / "rewards"
CORPUS = TESTS / "math_corpus.jsonl"
LENIENT = TESTS / "math_lenient_corpus.jsonl"


def ours(extraction: str) -> Callable[[str, str], bool]:
    from dspost.rewards import verify_math

    return lambda response, gold: verify_math(response, gold, extraction=extraction).status == "correct"


def theirs(response: str, gold: str) -> bool:
    from math_verify import parse, verify

    try:
        return bool(verify(parse(gold if "\\boxed" in gold or "$" in gold else f"${gold}$"), parse(response)))
    except Exception:  # noqa: BLE001 - math-verify raising counts as "not verified correct"
        return False


def _measure(fn: Callable[[str, str], bool], pairs: list[tuple[str, str, bool]]) -> dict:
    best, verdicts = float("inf"), []
    for _ in range(3):
        t = time.perf_counter()
        verdicts = [fn(r, g) for r, g, _ in pairs]
        best = min(best, time.perf_counter() - t)
    truth = [ok for _, _, ok in pairs]
    return {"acc": sum(v == t for v, t in zip(verdicts, truth)) / len(pairs),
            "fa": sum(v and not t for v, t in zip(verdicts, truth)),
            "fr": sum(t and not v for v, t in zip(verdicts, truth)), "rate": len(pairs) / best}


def bench_math() -> None:
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its per-answer timeout warnings
    regression = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    lenient = [json.loads(line) for line in LENIENT.read_text(encoding="utf-8").splitlines()]
    sets = {"regression corpus": [(r["response"], r["gold"], r["expected"] == "correct") for r in regression]}
    for split in ("dev", "heldout", None):
        name = f"lenient corpus, {split}" if split else "lenient corpus, all"
        sets[name] = [(r["response"], r["gold"], r["label"] == "correct")
                      for r in lenient if split in (None, r["split"])]
    verifiers = {"math-verify 0.9": theirs, "dspost strict": ours("strict"), "dspost lenient": ours("lenient")}
    print("math: one process, best of 3 passes; fa = false accepts (wrong graded correct), fr = false rejects")
    print(f"| {'pairs':<28} | {'verifier':<16} | accuracy | fa | fr | answers/s | vs math-verify |")
    print(f"|{'-' * 30}|{'-' * 18}|---|---|---|---|---|")
    for set_name, pairs in sets.items():
        base = None
        for name, fn in verifiers.items():
            m = _measure(fn, pairs)
            base = base or m["rate"]
            print(f"| {set_name + f' ({len(pairs)})':<28} | {name:<16} | {m['acc']:7.1%} | {m['fa']:2d} | "
                  f"{m['fr']:3d} | {m['rate']:9.0f} | {m['rate'] / base:6.1f}x |")


def bench_code(path: Path) -> None:
    from dspost.rewards import ScoringPool, run_code_tests
    from dspost.rewards.registry import resolve

    rows = [json.loads(line) for line in gzip.open(path, "rt")]
    t = time.perf_counter()
    verdicts = [run_code_tests(r["prompt"] + r["canonical_solution"], r["test"], 20, entry_point=r["entry_point"])
                for r in rows]
    seq = time.perf_counter() - t
    failed = [r["task_id"] for r, v in zip(rows, verdicts) if v.score != 1.0]
    print(f"code: {len(rows)} HumanEval canonical solutions, {len(rows) - len(failed)} score 1"
          + (f" (failed: {failed})" if failed else ""))
    print(f"  sequential            {len(rows) / seq:6.1f} samples/s")
    items = [(f"```python\n{r['prompt']}{r['canonical_solution']}```",
              {"tests": r["test"], "entry_point": r["entry_point"], "prompt": r["prompt"]}) for r in rows]
    with ScoringPool(2) as pool:
        t = time.perf_counter()
        pooled = pool.map(resolve("code"), items, timeout=30, kwargs={"timeout": 20})
        par = time.perf_counter() - t
    print(f"  scoring pool (2)      {len(rows) / par:6.1f} samples/s, {sum(v.score == 1.0 for v in pooled)} score 1")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--skip-code", action="store_true", help="only the math benchmark")
    p.add_argument("--humaneval", type=Path,
                   default=Path(__file__).resolve().parent.parent.parent / "shared/data/humaneval/HumanEval.jsonl.gz")
    a = p.parse_args()
    bench_math()
    if a.skip_code:
        return
    if a.humaneval.is_file():
        bench_code(a.humaneval)
    else:
        print(f"code: skipped ({a.humaneval} not found)")


if __name__ == "__main__":
    main()
