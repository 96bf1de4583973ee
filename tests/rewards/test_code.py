"""The code sandbox: correct grading, hostile code contained, the scorer still answering."""

import gzip
import json
import os
import socket
import time
from pathlib import Path

import pytest

from dspost.rewards import REWARDS, ScoringPool, run_code_tests, run_io_tests
from dspost.rewards.registry import resolve

ADD = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(-1, 1) == 0\n"
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="full isolation (namespaces, nobody) needs root")


def test_passing_failing_and_partial_scores():
    assert run_code_tests(ADD, TESTS, 10).status == "correct"
    wrong = "def add(a, b):\n    return a * b if a == 1 else a + b\n"  # fails exactly one assert
    v = run_code_tests(wrong, TESTS, 10)
    assert (v.score, v.status) == (0.0, "wrong") and v.detail.startswith("2/3")
    assert run_code_tests(wrong, TESTS, 10, partial=True).score == pytest.approx(2 / 3)
    assert run_code_tests("def add(a, b) return", TESTS, 10).status == "wrong"  # syntax error in the candidate


def test_humaneval_check_and_stdin_stdout_cases():
    check = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(0, 0) == 0\n"
    assert run_code_tests(ADD, check, 10, entry_point="add").status == "correct"
    assert run_code_tests(ADD.replace("+", "-"), check, 10, entry_point="add").status == "wrong"
    cases = [("2 3\n", "5\n"), ("10 -4\n", "6")]
    assert run_io_tests("a, b = map(int, input().split())\nprint(a + b)", cases, 10).status == "correct"
    v = run_io_tests("a, b = map(int, input().split())\nprint(a - b)", cases, 10, partial=True)
    assert v.status == "wrong" and v.score == 0.0  # 2-3 != 5 and 10+4 != 6


def test_faked_result_lines_do_not_count():
    forged = "print('\\n0123456789abcdef0123456789abcdef 3 3')\nimport os\nos._exit(0)\n"
    v = run_code_tests(forged, TESTS, 10)
    assert v.status == "error" and v.score == 0.0


def test_infinite_loop_and_fork_bomb_time_out_and_leave_nothing_running():
    t = time.monotonic()
    assert run_code_tests("while True:\n    pass\n", TESTS, 2).status == "timeout"
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    assert run_code_tests(bomb, TESTS, 2).status == "timeout"
    assert time.monotonic() - t < 15
    if os.geteuid() == 0:  # killed processes take a moment to be reaped
        deadline = time.monotonic() + 10
        while _live_sandbox_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _live_sandbox_processes()


def _live_sandbox_processes() -> list[str]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == 65534 and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z":
                out.append(pid)
        except (OSError, IndexError):
            pass
    return out


def test_memory_bomb_is_refused():
    v = run_code_tests("x = bytearray(8 * 1024 ** 3)\n", TESTS, 10, memory_mb=256)
    assert v.status == "wrong" and v.detail.startswith("0/")


@root_only
def test_writing_outside_the_sandbox_is_contained(tmp_path):
    target = tmp_path / "escaped"
    os.chmod(tmp_path, 0o777)
    for path in (target, Path("/tmp") / f"dspost-escape-{os.getpid()}", Path(__file__).parent / "escaped"):
        code = f"open({str(path)!r}, 'w').write('x')\n" + ADD
        run_code_tests(code, TESTS, 10)
        assert not path.exists(), path


@root_only
def test_no_network_no_parent_environment_no_signal_to_the_parent(monkeypatch):
    monkeypatch.setenv("DSPOST_SECRET", "s3cret")
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        dial = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n" + ADD
        assert run_code_tests(dial, TESTS, 10).status == "wrong"  # its loopback is not ours
    snoop = ("import os\nsecret = open(f'/proc/{os.getppid()}/environ').read() + str(dict(os.environ))\n"
             "assert 's3cret' in secret\n" + ADD)
    assert run_code_tests(snoop, TESTS, 10).status == "wrong"
    kill = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + ADD
    run_code_tests(kill, TESTS, 10)
    kill_all = "import os, signal\nos.kill(-1, signal.SIGKILL)\n" + ADD
    run_code_tests(kill_all, TESTS, 10)
    assert run_code_tests(ADD, TESTS, 10).status == "correct"  # we are still here and grading


def test_code_reward_in_the_scoring_pool_answers_every_item():
    example = {"tests": TESTS}
    responses = ["```python\n" + ADD + "```", "```python\nwhile True: pass\n```", "no code at all"]
    with ScoringPool(2) as pool:
        verdicts = pool.map(resolve("code"), [(r, example) for r in responses], timeout=20, kwargs={"timeout": 2})
    assert [v.status for v in verdicts] == ["correct", "timeout", "wrong"]
    assert "code" in REWARDS


def test_humaneval_canonical_solutions_all_pass(data_dir):
    if not (data_dir / "humaneval" / "HumanEval.jsonl.gz").is_file():
        pytest.skip("../shared/data/humaneval not available")
    rows = [json.loads(line) for line in gzip.open(data_dir / "humaneval" / "HumanEval.jsonl.gz", "rt")]
    failed = [r["task_id"] for r in rows[:40]
              if run_code_tests(r["prompt"] + r["canonical_solution"], r["test"], 20,
                                entry_point=r["entry_point"]).status != "correct"]
    assert not failed
