"""Run model-written Python against unit tests in a sandbox.

Each run is a fresh `python -I` in its own session (killed as a group on timeout) with CPU, memory,
file-size, process-count and core limits and a scrubbed environment. Started as root (CI, these machines)
it also gets new mount and network namespaces: private tmpfs over /tmp, /var/tmp and /dev/shm (its working
directory is in there), no network interface but loopback, and it drops to the `nobody` user, so it
cannot write the real file system, signal the parent, or read other processes' environments. Started as
another user, those namespaces are tried through a user namespace; whatever could not be set up is named
in the verdict's `detail` ("not isolated: ...").

Known limit: the candidate runs in the same interpreter as its tests (as in HumanEval's harness), so code
written to tamper with the harness itself is not prevented; the pass count is reported on a descriptor
duplicated before the candidate runs, tagged with a per-run nonce the candidate is not given."""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import resource
import secrets
import signal
import subprocess
import sys

from dspost.rewards.verdict import Verdict

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_REC, MS_PRIVATE = 0x4000, 0x40000
NOBODY = 65534
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")

# Runs inside the sandbox: exec the candidate, then each test; report "<nonce> passed total" on the saved fd.
_DRIVER = r"""
import ast, json, os, sys
job = json.loads(sys.stdin.read())
report = os.dup(1)
nonce = job.pop("nonce")
ns = {"__name__": "__candidate__"}
def run(src):
    try:
        exec(compile(src, "<test>", "exec"), ns)
        return True
    except BaseException:
        return False
passed = total = 0
if run(job["code"]):
    for node in ast.parse(job["tests"]).body:
        src = ast.unparse(node)
        if isinstance(node, ast.Assert):
            total += 1
            passed += run(src)
        elif not run(src):
            break
    if job["entry_point"] and "check" in ns and job["entry_point"] in ns:
        total += 1
        passed += run("check(" + job["entry_point"] + ")")
else:
    total = max(1, sum(isinstance(n, ast.Assert) for n in ast.parse(job["tests"]).body))
os.write(report, f"\n{nonce} {passed} {total}\n".encode())
"""


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _isolate(limits: dict) -> None:
    """preexec_fn: namespaces, private temp dirs, limits, then drop privileges. Reports gaps on stderr."""
    libc, gaps = _libc(), []
    root = os.geteuid() == 0
    flags = CLONE_NEWNS | CLONE_NEWNET | (0 if root else CLONE_NEWUSER)
    if libc.unshare(flags) != 0:
        gaps.append("network, file system (unshare failed: " + os.strerror(ctypes.get_errno()) + ")")
    else:
        libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
        for d in PRIVATE_DIRS:
            if os.path.isdir(d) and libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0, b"size=64m,mode=1777") != 0:
                gaps.append(f"{d} (tmpfs mount failed)")
    work = "/tmp/sandbox"
    os.makedirs(work, exist_ok=True)
    if root:
        os.chown(work, NOBODY, NOBODY)
    os.chdir(work)
    for what, value in limits.items():
        resource.setrlimit(what, (value, value))
    if root:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    else:
        gaps.append("same user as the parent (can signal it and read its /proc)")
    if gaps:
        os.write(2, ("dspost-sandbox: not isolated: " + "; ".join(gaps) + "\n").encode())


def _world_executable(path: str) -> bool:
    """Whether a user with no rights but "others" bits can run `path` (every directory on the way too)."""
    real = os.path.realpath(path)
    parts = real.split("/")
    dirs = ["/".join(parts[:i]) or "/" for i in range(1, len(parts))]
    try:
        return all(os.stat(d).st_mode & 0o001 for d in dirs) and bool(os.stat(real).st_mode & 0o001)
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def sandbox_python() -> str:
    """This interpreter, or (as root, when `nobody` cannot reach it, e.g. under /root) a system Python:
    the candidate needs only the standard library."""
    if os.geteuid() != 0 or _world_executable(sys.executable):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if _world_executable(candidate):
            return candidate
    raise RuntimeError(f"code sandbox: the `nobody` user cannot run {sys.executable} and no system python3 was found")


def _run(program: str, stdin: str, timeout: float, memory_mb: int) -> tuple[str, str, bool]:
    """One sandboxed `python -I -c program` fed `stdin`; returns (stdout, stderr, timed_out)."""
    limits = {resource.RLIMIT_AS: memory_mb << 20, resource.RLIMIT_CPU: int(timeout) + 1,
              resource.RLIMIT_FSIZE: 16 << 20, resource.RLIMIT_NPROC: 64, resource.RLIMIT_CORE: 0}
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp/sandbox", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen([sandbox_python(), "-I", "-c", program], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True,
                            preexec_fn=lambda: _isolate(limits), text=True, errors="replace")
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
        return out, err, False
    except subprocess.TimeoutExpired:
        return "", "", True
    finally:
        try:  # the whole session: whatever the candidate forked dies with it
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.communicate()


def _gaps(err: str) -> str:
    found = re.search(r"dspost-sandbox: (not isolated: [^\n]*)", err)
    return found.group(1) if found else ""


def run_code_tests(code: str, tests: str, timeout: float = 10.0, *, entry_point: str | None = None,
                   partial: bool = False, memory_mb: int = 512) -> Verdict:
    """Run `code`, then `tests`: each top-level `assert` is one test, and with `entry_point`, a defined
    `check(candidate)` (HumanEval) is one more. Score: all-or-nothing, or the passed fraction (`partial`)."""
    nonce = secrets.token_hex(16)
    job = json.dumps({"code": code, "tests": tests, "entry_point": entry_point, "nonce": nonce})
    out, err, timed_out = _run(_DRIVER, job, timeout, memory_mb)
    if timed_out:
        return Verdict(0.0, "timeout", None, f"no result within {timeout:g}s")
    found = re.findall(rf"^{nonce} (\d+) (\d+)$", out, re.M)
    if not found:
        tail = err.strip().splitlines()[-1:] or ["no output"]
        return Verdict(0.0, "error", None, f"sandbox gave no result: {tail[0][:200]}")
    passed, total = map(int, found[-1])
    score = passed / total if partial and total else float(passed == total and total > 0)
    status = "correct" if total and passed == total else "wrong"
    return Verdict(score, status, None, f"{passed}/{total} tests passed. {_gaps(err)}".strip())


def run_io_tests(code: str, cases: list[tuple[str, str]], timeout: float = 10.0, *, partial: bool = False,
                 memory_mb: int = 512) -> Verdict:
    """Run `code` as a program once per (stdin, expected stdout) case; outputs compared line by line,
    trailing whitespace ignored. `timeout` is per case."""
    passed, gaps = 0, ""
    for given, expected in cases:
        out, err, timed_out = _run(code, given, timeout, memory_mb)
        if timed_out and not partial:
            return Verdict(0.0, "timeout", None, f"a case ran past {timeout:g}s")
        gaps = gaps or _gaps(err)
        passed += not timed_out and _lines(out) == _lines(expected)
    total = len(cases)
    score = passed / total if partial and total else float(passed == total and total > 0)
    return Verdict(score, "correct" if total and passed == total else "wrong", None,
                   f"{passed}/{total} cases passed. {gaps}".strip())


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S)


def extract_code(response: str) -> str:
    """The last fenced code block, else the whole response."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response
