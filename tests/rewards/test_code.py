"""The code sandbox: correct grading, no forged pass, hostile code contained, the scorer still answering."""

import ctypes
import encodings.idna  # noqa: F401 - loaded before a test drops to a user who cannot read this stdlib
import gzip
import json
import os
import secrets
import signal
import socket
import textwrap
import threading
import time
from pathlib import Path

import pytest

from dspost.rewards import REWARDS, ScoringPool, run_code_tests, run_io_tests, sandbox
from dspost.rewards.pool import isolate_network
from dspost.rewards.registry import resolve


def src(text: str) -> str:
    """A program written indented in this file."""
    return textwrap.dedent(text).lstrip("\n")


ADD = "def add(a, b):\n    return a + b\n"
WRONG_ADD = "def add(a, b):\n    return a - b\n"
TESTS = "assert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(-1, 1) == 0\n"
SUM_IO = "a, b = map(int, input().split())\nprint(a + b)"


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
    assert run_io_tests(SUM_IO, cases, 10).status == "correct"
    v = run_io_tests(SUM_IO.replace("+", "-"), cases, 10, partial=True)
    assert v.status == "wrong" and v.score == 0.0  # 2-3 != 5 and 10+4 != 6


def test_results_are_plain_data_and_exceptions_keep_their_type():
    code = src("""
        import math
        SCALE = (2, 'x')
        def f(x):
            return {'t': (1, 2.5), 's': {3}, 'b': b'\\x00', 'n': None, 'c': 1j, 'x': x}
        def g(x):
            raise ValueError('negative')
        """)
    tests = src("""
        assert f([1, (2,)]) == {'t': (1, 2.5), 's': {3}, 'b': b'\\x00', 'n': None, 'c': 1j, 'x': [1, (2,)]}
        assert type(f(0)['t']) is tuple
        assert SCALE == (2, 'x') and math.pi > 3
        try:
            g(-1)
            raise AssertionError('no exception')
        except ValueError as e:
            ok = 'negative' in str(e)
        assert ok
        """)
    assert run_code_tests(code, tests, 10).status == "correct"
    values = ["float('inf')", "-0.0", "10 ** 400", "{(1, 2): {3: b'x'}}", "'a\\nb\\u00e9\\x00'", "1e-05",
              "frozenset({1})", "2j", "True", "None", "[[[]]]"]
    tests = "".join(f"assert same({x}) == {x} and type(same({x})) is type({x})\n" for x in values)
    tests += "import math\nassert math.isnan(same(float('nan')))\n"
    assert run_code_tests("def same(x):\n    return x\n", tests, 10).status == "correct"


def test_faked_result_lines_do_not_count():
    forged = "print('\\n0123456789abcdef0123456789abcdef 3 3')\nimport os\nos._exit(0)\n"
    v = run_code_tests(forged, TESTS, 10)
    assert v.status == "wrong" and v.score == 0.0


# Finds 775a309's per-run nonce (any 32-hex string in a dict) and writes its verdict line to every fd.
HUNT = src("""
    def forge(*_):
        import gc, os, re
        found = {v for o in gc.get_objects() if type(o) is dict for v in o.values()
                 if type(v) is str and re.fullmatch('[0-9a-f]{32}', v)}
        for fd in range(3, 64):
            for nonce in found:
                try:
                    os.write(fd, f'\\n{nonce} 3 3\\n'.encode())
                except OSError:
                    pass
    """)
# Each of these scored 1.0 at 775a309, where the candidate's interpreter reported the verdict.
FORGERIES = {
    "nonce from __main__": src("""
        import __main__, os
        os.write(__main__.report, f'\\n{__main__.nonce} 3 3\\n'.encode())
        os._exit(0)
        """),
    "nonce hunted with gc, written to every fd": HUNT + "forge()\nimport os\nos._exit(0)\n",
    "nonce from the caller's frame (inspect)": src("""
        import inspect, os
        g = inspect.stack()[1].frame.f_globals
        os.write(g['report'], f"\\n{g['nonce']} 3 3\\n".encode())
        os._exit(0)
        """),
    "harness function replaced": "import __main__\n__main__.run = lambda src: True\n" + WRONG_ADD,
    "builtins patched": "import builtins\nbuiltins.exec = lambda *a, **k: None\n" + WRONG_ADD,
    "object equal to everything": src("""
        class Same:
            def __eq__(self, other):
                return True
        def add(a, b):
            return Same()
        """),
    "builtin shadowed": "def abs(x):\n    return 0\n" + WRONG_ADD,
    "StopIteration ends the test's iteration": "def add(a, b):\n    raise StopIteration\n",
}
FORGERY_TESTS = {"builtin shadowed": "assert abs(add(2, 2) - 4) < 1e-9\n",
                 "StopIteration ends the test's iteration": "assert all(map(add, [1], [2]))\n"
                                                            "assert list(map(add, [1], [2])) == []\n"}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_a_candidate_cannot_forge_a_pass(name):
    v = run_code_tests(FORGERIES[name], FORGERY_TESTS.get(name, TESTS), 5)
    assert (v.status, v.score) == ("wrong", 0.0), v


def test_a_check_the_tests_do_not_define_is_not_counted():
    own_check = "def check(candidate):\n    pass\n" + WRONG_ADD
    assert run_code_tests(own_check, "x = 1\n", 5, entry_point="add").status == "wrong"
    # ... and the tests' own check is the one that runs, whatever the candidate defines.
    tests = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    assert run_code_tests(own_check, tests, 5, entry_point="add").status == "wrong"


EXITS = {
    "sys.exit at top level": "import sys\nsys.exit(0)\n" + ADD,
    "os._exit at top level": "import os\nos._exit(0)\n" + ADD,
    "os._exit in the function": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "sys.exit in the function": "import sys\ndef add(a, b):\n    sys.exit(0)\n",
    "exit after the first answers": "import os\ndef add(a, b):\n    if a < 0:\n        os._exit(0)\n    return a + b\n",
    "atexit writes the verdict": HUNT + "import atexit\natexit.register(forge)\nraise SystemExit(0)\n",
    "sys.excepthook writes the verdict": HUNT + "import sys\nsys.excepthook = forge\nraise RuntimeError\n",
}


@pytest.mark.parametrize("name", list(EXITS))
def test_exiting_early_never_passes(name):
    v = run_code_tests(EXITS[name], TESTS, 5)
    assert (v.status, v.score) == ("wrong", 0.0), v


def test_output_and_malformed_answers():
    chatty = src("""
        import sys
        print('["ok", 3]')
        sys.stderr.write('x' * 100000)
        def add(a, b):
            print('["ok", 0]')
            return a + b
        """)
    assert run_code_tests(chatty, TESTS, 5).status == "correct"  # its prints never reach the protocol
    garbage = "import __main__, os\nos.write(__main__.reply_fd, b'garbage\\n')\n" + ADD
    v = run_code_tests(garbage, TESTS, 5)
    assert v.status == "wrong" and "malformed" in v.detail
    swallowed = "try:\n    add(0, 0)\nexcept BaseException:\n    pass\nassert 1 + 1 == 2\n"  # the tests catch the break
    assert run_code_tests(EXITS["os._exit in the function"], swallowed, 5).status == "wrong"
    assert run_code_tests("def add(a, b):\n    return 'x' * (20 << 20)\n", TESTS, 10).status == "wrong"  # > 16 MiB
    assert run_code_tests("import time\ndef add(a, b):\n    time.sleep(60)\n", TESTS, 1.5).status == "timeout"


def _marked(marker: str) -> list[int]:
    """Live processes whose command line holds `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            alive = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
            if alive and marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except (OSError, IndexError):
            pass
    return found


def _none_left(marker: str, wait: float = 5.0) -> list[int]:
    """Marked processes still alive after `wait` seconds; stopped and killed here (they may be forking),
    so that a failing test leaves none behind."""
    deadline = time.monotonic() + wait
    while (left := _marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(50):
        if not (pids := _marked(marker)):
            break
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        time.sleep(0.1)
    return left


def _forker(marker: str, then: str = ADD) -> str:
    """Candidate code whose 4 children leave the session and exec a loop that forks on, `marker` in argv."""
    loop = r"import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.05)"
    return src(f"""
        import os, sys
        for _ in range(4):
            if os.fork() == 0:
                os.setsid()
                os.execv(sys.executable, [sys.executable, '-c', '{loop}', '{marker}'])
        """) + then


def test_infinite_loop_and_fork_bomb_time_out_and_leave_nothing_running():
    t = time.monotonic()
    assert run_code_tests("while True:\n    pass\n", TESTS, 2).status == "timeout"
    marker = f"dspost-test-{secrets.token_hex(6)}"
    assert run_code_tests(_forker(marker, then="while True:\n    pass\n"), TESTS, 2).status == "timeout"
    assert time.monotonic() - t < 15
    assert not _none_left(marker)


def test_children_that_call_setsid_die_with_the_run():
    marker = f"dspost-test-{secrets.token_hex(6)}"
    assert run_code_tests(_forker(marker), TESTS, 3).status == "correct"
    assert not _none_left(marker)


def test_a_killed_scoring_worker_leaves_no_sandbox_process():
    marker = f"dspost-test-{secrets.token_hex(6)}"
    response = "```python\n" + _forker(marker, then="import time\ntime.sleep(60)\n") + "```"
    with ScoringPool(1) as pool:
        [v] = pool.map(resolve("code"), [(response, {"tests": TESTS})], timeout=2, kwargs={"timeout": 30})
        assert v.status == "timeout" and pool.restarts == 1  # the worker itself was killed at the deadline
    assert not _none_left(marker)


FORKS = src("""
    import os, time
    def forks():
        n = 0
        try:
            while n < 300:
                if os.fork() == 0:
                    time.sleep(3)
                    os._exit(0)
                n += 1
        except OSError:
            pass
        return n
    """)


def test_processes_are_capped_and_never_root_outside():
    assert run_code_tests(FORKS, "assert 40 < forks() < 100\n", 10).status == "correct"  # the cap is 64
    marker = f"dspost-test-{secrets.token_hex(6)}"
    sleeper = src(f"""
        import os, sys, time
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(5)', '{marker}'])
        time.sleep(1)
        """) + ADD
    running = threading.Thread(target=run_code_tests, args=(sleeper, TESTS, 10))
    running.start()
    deadline = time.monotonic() + 5
    while not (pids := _marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    uids = {os.stat(f"/proc/{pid}").st_uid for pid in pids}
    running.join()
    assert pids and 0 not in uids and uids <= {os.geteuid() or 65534}, uids
    assert not _none_left(marker)


TOUCHED = "def add(a, b):\n    return len(b'x' * (1 << 30)) and a + b\n"  # 1 GiB really written


def test_memory_bomb_is_refused():
    v = run_code_tests("x = bytearray(8 * 1024 ** 3)\n", TESTS, 10, memory_mb=256)
    assert v.status == "wrong" and v.detail.startswith("0/")
    assert run_code_tests(TOUCHED, TESTS, 10, memory_mb=256).status == "wrong"


@pytest.mark.skipif(not any(c == "memory" for c, _ in sandbox._cgroup_bases(os.geteuid())),
                    reason="no writable memory cgroup here (memory is then limited per process only)")
def test_memory_is_limited_across_the_process_tree():
    tree = src("""
        import os, time
        def add(a, b):
            kids = []
            for _ in range(4):
                pid = os.fork()
                if pid == 0:
                    x = b'x' * (200 << 20)
                    time.sleep(1)
                    os._exit(0)
                kids.append(pid)
            ok = all(os.waitpid(k, 0)[1] == 0 for k in kids)
            return a + b if ok else None
        """)
    # each child stays under its 256 MiB address space; the four together pass the sandbox's cgroup limit
    assert run_code_tests(tree, "assert add(1, 2) == 3\n", 20, memory_mb=256).status == "wrong"
    assert run_code_tests(tree, "assert add(1, 2) == 3\n", 20, memory_mb=2048).status == "correct"


def _shm_segments() -> set[str]:
    return {line.split()[1] for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]}


def test_sysv_shared_memory_does_not_outlive_the_run():
    before = _shm_segments()
    code = src("""
        import ctypes
        libc = ctypes.CDLL(None)
        libc.shmat.restype = ctypes.c_void_p
        SHMID = libc.shmget(0, 8 << 20, 0o1600)
        ctypes.memset(libc.shmat(SHMID, None, 0), 1, 8 << 20)
        def made():
            return SHMID
        """)
    v = run_code_tests(code, "assert made() >= 0\n", 5)
    left = _shm_segments() - before
    libc = ctypes.CDLL(None)
    for shmid in left:  # a failing run would otherwise leave 8 MiB behind
        libc.shmctl(int(shmid), 0, None)  # IPC_RMID
    assert v.status == "correct", v  # the segment was made, in the sandbox's own IPC namespace
    assert not left


def test_writing_outside_the_sandbox_is_contained(tmp_path):
    target = tmp_path / "escaped"
    os.chmod(tmp_path, 0o777)
    tag = f"dspost-escape-{os.getpid()}-{secrets.token_hex(4)}"
    paths = [target, Path("/tmp") / tag, Path("/var/tmp") / tag, Path("/run/lock") / tag, Path("/dev/shm") / tag,
             Path(__file__).parent / "escaped"]
    writes = "".join(f"try:\n    open({str(p)!r}, 'w').write('x')\nexcept OSError:\n    pass\n" for p in paths)
    try:
        assert run_code_tests(writes + ADD, TESTS, 10).status == "correct"
        assert not [p for p in paths if p.exists()]
    finally:
        for p in paths:
            p.unlink(missing_ok=True)


def test_no_network_no_parent_environment_no_signal_to_the_parent(monkeypatch):
    monkeypatch.setenv("DSPOST_SECRET", "s3cret")
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        dial = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n" + ADD
        assert run_code_tests(dial, TESTS, 10).status == "wrong"  # its loopback is not ours
    snoop = src("""
        import os
        secret = open(f'/proc/{os.getppid()}/environ').read() + str(dict(os.environ))
        assert 's3cret' in secret
        """) + ADD
    assert run_code_tests(snoop, TESTS, 10).status == "wrong"
    kill = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + ADD
    run_code_tests(kill, TESTS, 10)
    kill_all = "import os, signal\nos.kill(-1, signal.SIGKILL)\n" + ADD
    run_code_tests(kill_all, TESTS, 10)
    assert run_code_tests(ADD, TESTS, 10).status == "correct"  # we are still here and grading


def test_host_processes_and_other_sandboxes_are_out_of_sight_and_reach():
    seen = "import os\ndef pids():\n    return [int(p) for p in os.listdir('/proc') if p.isdigit()]\n"
    assert run_code_tests(seen, f"assert {os.getpid()} in pids()\n", 5).status == "wrong"
    slow = "import time\ndef add(a, b):\n    time.sleep(1.5)\n    return a + b\n"
    result = {}
    other = threading.Thread(target=lambda: result.update(v=run_code_tests(slow, "assert add(1, 2) == 3\n", 10)))
    other.start()
    time.sleep(0.7)  # the other sandbox is up and inside add()
    killer = src("""
        import os, signal
        for pid in [-1] + [int(p) for p in os.listdir('/proc') if p.isdigit()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        """) + ADD
    run_code_tests(killer, TESTS, 5)
    other.join()
    assert result["v"].status == "correct", result["v"]


def test_refused_with_the_reason_when_no_sandbox_can_start(monkeypatch):
    for bwrap, reason in ((None, "not installed"), ("/bin/false", "bubblewrap failed")):
        monkeypatch.setattr(sandbox, "_bwrap", lambda: bwrap)
        sandbox._preflight.cache_clear()
        try:
            assert reason in (sandbox.sandbox_unavailable() or "")
            for v in (run_code_tests(ADD, TESTS, 5), run_io_tests("print(1)", [("", "1")], 5)):
                assert v.status == "error" and reason in v.detail
        finally:
            sandbox._preflight.cache_clear()


def _as_nobody(fn) -> dict:
    """`fn()` in a forked child that dropped to uid 65534 (no capabilities); its JSON-able result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(r)
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, as for a process started as that user
            os.chdir("/")
            out = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = {"raised": repr(e)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="the test drops from root to nobody")
def test_the_non_root_path_works():
    """As an unprivileged user: grading works, also inside a scoring worker's own user + network namespace."""
    def grade(port: int) -> dict:
        out = {"available": sandbox.sandbox_unavailable(), "tests": run_code_tests(ADD, TESTS, 10).status,
               "wrong": run_code_tests(WRONG_ADD, TESTS, 10).status,
               "io": run_io_tests(SUM_IO, [("2 3\n", "5\n")], 10).status,
               "forged": run_code_tests(FORGERIES["nonce from __main__"], TESTS, 5).status,
               "capped": run_code_tests(FORKS, "assert 40 < forks() < 100\n", 10).status,
               "memory": run_code_tests(TOUCHED, TESTS, 10, memory_mb=256).status,
               "isolated": isolate_network()}
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            out["network"] = "reached"
        except OSError:
            out["network"] = "unreachable"
        out["in worker"] = run_code_tests(ADD, TESTS, 10).status
        return out

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        out = _as_nobody(lambda: grade(srv.getsockname()[1]))
    assert out == {"available": None, "tests": "correct", "wrong": "wrong", "io": "correct", "forged": "wrong",
                   "capped": "correct", "memory": "wrong", "isolated": None, "network": "unreachable",
                   "in worker": "correct"}, out


def test_code_reward_in_the_scoring_pool_answers_every_item():
    example = {"tests": TESTS}
    responses = ["```python\n" + ADD + "```", "```python\nwhile True: pass\n```", "no code at all"]
    with ScoringPool(2) as pool:
        verdicts = pool.map(resolve("code"), [(r, example) for r in responses], timeout=20, kwargs={"timeout": 2})
    assert [v.status for v in verdicts] == ["correct", "timeout", "wrong"]
    assert "code" in REWARDS


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(data_dir):
    if not (data_dir / "humaneval" / "HumanEval.jsonl.gz").is_file():
        pytest.skip("../shared/data/humaneval not available")
    rows = [json.loads(line) for line in gzip.open(data_dir / "humaneval" / "HumanEval.jsonl.gz", "rt")][:40]
    same = "    class Same:\n        def __eq__(self, other):\n            return True\n    return Same()\n"
    failed, passed_wrong = [], []
    for r in rows:
        v = run_code_tests(r["prompt"] + r["canonical_solution"], r["test"], 20, entry_point=r["entry_point"])
        failed += [r["task_id"]] if v.status != "correct" else []
        for body in ("    return None\n", same):  # a wrong answer, and one equal to everything
            v = run_code_tests(r["prompt"] + body, r["test"], 20, entry_point=r["entry_point"])
            passed_wrong += [r["task_id"]] if v.status != "wrong" else []
    assert not failed and not passed_wrong, (failed, passed_wrong)
