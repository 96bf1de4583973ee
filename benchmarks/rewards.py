"""Verifier benchmarks, side by side in one run.

1. Math: our `verify_math` vs `math-verify` (`parse` + `verify`) on the regression corpus
   (tests/rewards/math_corpus.jsonl): throughput in one process (best of 3 passes) and agreement with the
   corpus's expected verdicts (target: >= 5x math-verify's throughput, accuracy no lower).
2. Code: the sandbox on HumanEval's canonical solutions (every one must score 1), samples/s, sequential
   and through the scoring pool.

    python benchmarks/rewards.py [--humaneval ../shared/data/humaneval/HumanEval.jsonl.gz]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "rewards" / "math_corpus.jsonl"


def ours(response: str, gold: str) -> bool:
    from dspost.rewards import verify_math

    return verify_math(response, gold).status == "correct"


def theirs(response: str, gold: str) -> bool:
    from math_verify import parse, verify

    try:
        return bool(verify(parse(gold if "\\boxed" in gold or "$" in gold else f"${gold}$"), parse(response)))
    except Exception:  # noqa: BLE001 - math-verify raising counts as "not verified correct"
        return False


def bench_math() -> None:
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    print(f"math: {len(rows)} corpus cases, one process, best of 3 passes")
    for name, fn in (("math-verify", theirs), ("dspost verify_math", ours)):
        best, verdicts = float("inf"), []
        for _ in range(3):
            t = time.perf_counter()
            verdicts = [fn(r["response"], r["gold"]) for r in rows]
            best = min(best, time.perf_counter() - t)
        agree = sum(v == (r["expected"] == "correct") for v, r in zip(verdicts, rows)) / len(rows)
        results = getattr(bench_math, "results", {})
        results[name] = len(rows) / best
        bench_math.results = results
        base = results.get("math-verify", len(rows) / best)
        print(f"  {name:<20} {len(rows) / best:8.0f} answers/s  {len(rows) / best / base:5.2f}x  "
              f"agreement with expected {agree:.1%}")


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
    p.add_argument("--humaneval", type=Path,
                   default=Path(__file__).resolve().parent.parent.parent / "shared/data/humaneval/HumanEval.jsonl.gz")
    a = p.parse_args()
    bench_math()
    if a.humaneval.is_file():
        bench_code(a.humaneval)
    else:
        print(f"code: skipped ({a.humaneval} not found)")


if __name__ == "__main__":
    main()
