"""The code sandbox and the scoring pool: 775a309's implementation against this one, side by side in one run.

775a309 ran the candidate and its tests in one `python -I` with unshare + rlimits (in-process verdict);
this one runs the candidate in bubblewrap (user/PID/IPC/net/mount/UTS namespaces, cgroups as root) and the
tests in the harness, one JSON round trip per call. Rounds alternate old/new so that load on the shared
machine hits both alike.

1. Per-run overhead: median (and fastest) ms per trivial candidate that passes and one that fails.
2. HumanEval's first 40 canonical solutions: wall time for all 40 (every one must be `correct`).
3. The math reward in the scoring pool: pool start-up and items/s, 775a309's pool (no network isolation)
   against this one (each worker in its own network namespace).

    python benchmarks/sandbox.py [--rounds 5] [--humaneval ../shared/data/humaneval/HumanEval.jsonl.gz] 2>/dev/null

(stderr: sympy's deprecation warnings from the math workers.)
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE = "775a309"
CORPUS = REPO / "tests" / "rewards" / "math_corpus.jsonl"
ADD = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(-1, 1) == 0\n"


def load_old(path: str, name: str, folder: Path):
    """775a309's `path` as module `name` (importable by the pool's worker processes: `folder` is on sys.path)."""
    show = subprocess.run(["git", "show", f"{BASE}:{path}"], cwd=REPO, check=True, capture_output=True, text=True)
    source = show.stdout
    (folder / f"{name}.py").write_text(source)
    return importlib.import_module(name)


def per_run(old, new, rounds: int) -> None:
    print(f"1. per-run overhead, trivial candidate, median of {rounds * 10} runs each (ms)")
    cases = {"pass": ADD, "fail": ADD.replace("+", "-")}
    times: dict[tuple[str, str], list[float]] = {(m, c): [] for m in ("775a309", "now") for c in cases}
    for _ in range(rounds):
        for label, module in (("775a309", old), ("now", new)):
            for case, code in cases.items():
                for _ in range(10):
                    t = time.perf_counter()
                    v = module.run_code_tests(code, TESTS, 10)
                    times[label, case].append(time.perf_counter() - t)
                    assert v.status == ("correct" if case == "pass" else "wrong"), v
    for case in cases:
        a, b = (statistics.median(times[m, case]) * 1e3 for m in ("775a309", "now"))
        lo_a, lo_b = (min(times[m, case]) * 1e3 for m in ("775a309", "now"))
        print(f"   {case:<5} 775a309 {a:7.1f}   now {b:7.1f}   now/775a309 {b / a:5.2f}x   "
              f"(fastest {lo_a:.1f} / {lo_b:.1f})")


def humaneval(old, new, path: Path, rounds: int) -> None:
    rows = [json.loads(line) for line in gzip.open(path, "rt")][:40]
    print(f"2. HumanEval first 40 canonical solutions, wall time for all 40 (s), {rounds} rounds")
    walls: dict[str, list[float]] = {"775a309": [], "now": []}
    for _ in range(rounds):
        for label, module in (("775a309", old), ("now", new)):
            t = time.perf_counter()
            bad = [r["task_id"] for r in rows if module.run_code_tests(
                r["prompt"] + r["canonical_solution"], r["test"], 20, entry_point=r["entry_point"]).status != "correct"]
            walls[label].append(time.perf_counter() - t)
            assert not bad, (label, bad)
    a, b = statistics.median(walls["775a309"]), statistics.median(walls["now"])
    print(f"   median 775a309 {a:6.2f}   now {b:6.2f}   now/775a309 {b / a:5.2f}x   "
          f"(min {min(walls['775a309']):.2f} / {min(walls['now']):.2f})")


def pool(old_pool, new_pool, rounds: int) -> None:
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    pairs = [(r["response"], r["gold"]) for r in rows]
    print(f"3. math reward in the scoring pool, 2 workers, {len(pairs)} items per pass, {rounds} rounds")
    start: dict[str, list[float]] = {"775a309": [], "now": []}
    rate: dict[str, list[float]] = {"775a309": [], "now": []}
    statuses: dict[str, list[str]] = {}
    for _ in range(rounds):
        for label, module in (("775a309", old_pool), ("now", new_pool)):
            t = time.perf_counter()
            with module.ScoringPool(2) as p:
                p.map("dspost.rewards.math:verify_math", pairs[:2], 60)  # workers up and sympy imported
                start[label].append(time.perf_counter() - t)
                t = time.perf_counter()
                verdicts = p.map("dspost.rewards.math:verify_math", pairs, 5)
                rate[label].append(len(pairs) / (time.perf_counter() - t))
            statuses[label] = [v.status for v in verdicts]
    assert statuses["775a309"] == statuses["now"], "the pools disagree"
    a, b = statistics.median(start["775a309"]), statistics.median(start["now"])
    print(f"   start-up to first answers (s): 775a309 {a:5.2f}   now {b:5.2f}")
    a, b = statistics.median(rate["775a309"]), statistics.median(rate["now"])
    print(f"   items/s: 775a309 {a:7.0f}   now {b:7.0f}   now/775a309 {b / a:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--humaneval", type=Path,
                    default=REPO.parent / "shared" / "data" / "humaneval" / "HumanEval.jsonl.gz")
    args = ap.parse_args()
    from dspost.rewards import code as new
    from dspost.rewards import pool as new_pool

    problem = new.sandbox_unavailable()
    if problem:
        sys.exit(problem)
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, tmp)  # before the pools start their forkserver, which copies sys.path
        old = load_old("rewards/code.py", "dspost_code_775a309", Path(tmp))
        old_pool = load_old("rewards/pool.py", "dspost_pool_775a309", Path(tmp))
        per_run(old, new, args.rounds)
        if args.humaneval.is_file():
            humaneval(old, new, args.humaneval, max(1, args.rounds // 2))
        else:
            print(f"2. skipped: {args.humaneval} not found")
        pool(old_pool, new_pool, args.rounds)


if __name__ == "__main__":
    main()
