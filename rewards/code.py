"""Grade model-written Python against unit tests; the verdict is decided outside the candidate's process.

How a run works. The candidate's code runs in a bubblewrap sandbox (`rewards/sandbox.py`) under a small
server that loads it and then answers calls. The tests (asserts, a HumanEval `check(candidate)`) run here,
in the harness (the scoring worker), against proxies: calling one of the candidate's functions sends the
arguments to the sandbox as JSON and returns what the function returned, rebuilt here as plain data. Each
top-level `assert` is one test; with `entry_point`, a `check` the tests define is one more. stdin/stdout
programs (`run_io_tests`) run sandboxed too, their output compared here.

Threat model: the candidate is hostile and wants a pass it did not earn, or to harm the machine or other runs.

Prevented (each has a test in tests/rewards/test_code.py):
- Forging the verdict. The candidate's process never holds it and there is no nonce or secret to find (with
  `gc`, `inspect`, /proc/self/fd): it only ever sends return values. They come back as plain data only
  (None, bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict, size- and depth-capped;
  never pickle) and are rebuilt here from builtin types, so an object with a forged `__eq__` never reaches a
  comparison. An exception comes back as the builtin type of that name, else a generic one; never
  StopIteration, which would silently end a test's `map`/`all` early. Whatever it prints, writes to any
  descriptor, or patches in its own interpreter (`__main__`, builtins, its own `check`) cannot decide a
  test; a candidate that exits (`sys.exit`, `os._exit`, at top level or inside the function under test, via
  `atexit` or `sys.excepthook`), hangs, or sends what is not a well-formed answer fails every later call, and
  such a run is never `correct`. A `check` counts only when the tests define it.
- Shadowing the tests' own names: the candidate's dunder names and names of builtins (`len`, `abs`, ...)
  are not visible to the tests (the entry point excepted), so `def abs(x): return 0` cannot pass
  `assert abs(f(x) - y) < 1e-6`.
- Escaping or harming the machine: no network (own network namespace), no view of host processes or
  other sandboxes (own PID namespace: it can signal, ptrace or see nothing outside), own SysV IPC, a
  read-only file system of /usr alone plus size-capped private tmpfs (/tmp, /dev/shm: nothing it writes
  persists, /run/lock does not exist), a scrubbed environment, no capabilities, never root outside.
- Outliving or hogging: wall clock (killed), memory, CPU time, process count, file size, no core files;
  everything it started dies with the sandbox, also when the scoring worker itself is killed.

Not prevented:
- Side channels (timing, caches, Spectre-class) and kernel bugs: the sandbox shares the host's kernel
  (namespaces and rlimits, no VM, no seccomp filter beyond bubblewrap's defaults).
- Seeing what it is given: the arguments of each call, and the tests themselves if the prompt shows them;
  answers memorised from public benchmarks.
- Helpers the tests call by name that the candidate may (re)define, e.g. HumanEval/32's `poly`, as in
  HumanEval's own harness.
- Resource use within the limits: CPU time up to the timeout on shared cores. Without a writable cgroup
  (non-root) memory is capped per process (RLIMIT_AS) and /tmp at 64 MiB, not across a forked tree, and
  SysV shared memory in its own IPC namespace lives until the run ends.
- Tests the protocol cannot express fail rather than pass: arguments that are not plain data (lambdas,
  objects), a test that inspects an argument the candidate mutated, classes and generators as results.
- The tests themselves are trusted input: they run unsandboxed in the harness, like the graders they are.
"""

from __future__ import annotations

import ast
import builtins
import json
import keyword
import os
import re
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from dspost.rewards.sandbox import Limits, Sandbox, run_program, sandbox_python, sandbox_unavailable
from dspost.rewards.verdict import Verdict

__all__ = ["extract_code", "run_code_tests", "run_io_tests", "sandbox_unavailable"]

MAX_MESSAGE = 16 << 20  # bytes per answer from the sandbox
MAX_DEPTH = 100  # nesting of containers in an answer
MAX_ARG = 128 << 10  # Linux's limit on one command-line argument (a -c program)
# Standard modules a candidate's imports may hand to the tests, except those that act when imported.
_STDLIB = frozenset(sys.stdlib_module_names) - {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle",
                                                 "__hello__", "__phello__", "webbrowser"}

# Runs inside the sandbox (any Python 3): announce itself, then answer ["load", code] with the exported
# names and ["call", name, args, kwargs] with ["ok", value] or ["raise", type, message]. Requests come as
# Python literals of plain data (from the trusted harness), answers go out as JSON, one per line; both
# without importing `json`, whose `re` and `enum` imports would double the interpreter's start-up (5.7 ms
# measured, of 8.9). Its integrity is not relied on: the candidate can rewrite it, and gains nothing by that.
_SERVER = r"""
import os, sys, types
try:
    from _json import encode_basestring_ascii as quote
except ImportError:
    from json import dumps as quote
requests = os.fdopen(os.dup(0), "rb")
reply_fd = os.dup(1)
null = os.open("/dev/null", os.O_RDONLY)
os.dup2(null, 0)
os.dup2(2, 1)
TAGS = {list: "l", tuple: "t", set: "s", frozenset: "f"}
KINDS = {"l": list, "t": tuple, "s": set, "f": frozenset}
INF = float("inf")
LITERALS = {"__builtins__": {}, "inf": INF, "nan": INF - INF}
ns = {"__name__": "__candidate__"}

def enc(v, depth=0):
    t = type(v)
    if depth > 100:
        raise ValueError("nested too deeply")
    if v is None:
        return "null"
    if t is bool:
        return "true" if v else "false"
    if t is int:
        return str(v)
    if t is float:
        return repr(v) if -INF < v < INF else "NaN" if v != v else "Infinity" if v > 0 else "-Infinity"
    if t is str:
        return quote(v)
    if t in TAGS:
        return '["%s",[%s]]' % (TAGS[t], ",".join(enc(x, depth + 1) for x in v))
    if t is dict:
        return '["d",[%s]]' % ",".join("[%s,%s]" % (enc(k, depth + 1), enc(x, depth + 1)) for k, x in v.items())
    if t is bytes:
        return '["b",%s]' % quote(v.hex())
    if t is complex:
        return '["c",[%s,%s]]' % (enc(v.real), enc(v.imag))
    raise TypeError("returned a %s, which is not plain data" % t.__name__)

def dec(v):
    if type(v) is not list:
        return v
    tag, x = v
    if tag == "p":
        return ns[x]
    if tag == "d":
        return {dec(k): dec(y) for k, y in x}
    if tag == "b":
        return bytes.fromhex(x)
    if tag == "c":
        return complex(*x)
    return KINDS[tag](dec(y) for y in x)

def exports():
    out = []
    partial = getattr(sys.modules.get("functools"), "partial", ())
    for name, value in list(ns.items()):
        if name.startswith("__"):
            continue
        if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, partial)):
            out.append('[%s,"f"]' % quote(name))
        elif isinstance(value, types.ModuleType):
            out.append('[%s,"m",%s]' % (quote(name), quote(value.__name__)))
        else:
            try:
                text = enc(value)
            except Exception:
                continue
            if len(text) < 1 << 20:
                out.append('[%s,"v",%s]' % (quote(name), text))
    return "[" + ",".join(out) + "]"

def send(text):
    data = (text + "\n").encode()
    while data:
        data = data[os.write(reply_fd, data):]

send('["ready"]')
for line in requests:
    try:
        req = eval(line, LITERALS)
        if req[0] == "load":
            exec(compile(req[1], "<candidate>", "exec"), ns)
            reply = '["ok",%s]' % exports()
        else:
            reply = '["ok",%s]' % enc(ns[req[1]](*dec(req[2]), **dec(req[3])))
    except BaseException as e:
        try:
            reply = '["raise",%s,%s]' % (quote(type(e).__name__), quote(str(e)[:1000]))
        except BaseException:
            reply = '["raise","Exception",""]'
    send(reply)
"""


class _Timeout(BaseException):
    """The run's deadline passed (a BaseException: test code's `except Exception` must not swallow it)."""


class _Broken(BaseException):
    """The candidate's process ended or sent something that is not a well-formed answer."""


class _NotStarted(Exception):
    """The sandbox's server never announced itself: an infrastructure failure, not the candidate's."""


class CandidateError(Exception):
    """An exception raised by the candidate that has no safe builtin counterpart here."""


# --------------------------------------------------------------------------------------------- plain data
_KINDS: dict[str, type] = {"l": list, "t": tuple, "s": set, "f": frozenset}
_TAGS = {v: k for k, v in _KINDS.items()}
_SCALARS = (type(None), bool, int, float, str)


def encode(value: Any, depth: int = 0) -> Any:
    """A test's argument as JSON-ready tagged data; the candidate's own functions pass by name."""
    t = type(value)
    if depth > MAX_DEPTH:
        raise ValueError("argument nested too deeply")
    if t in _SCALARS:
        return value
    if t in _TAGS:
        return [_TAGS[t], [encode(x, depth + 1) for x in value]]
    if t is dict:
        return ["d", [[encode(k, depth + 1), encode(x, depth + 1)] for k, x in value.items()]]
    if t is bytes:
        return ["b", value.hex()]
    if t is complex:
        return ["c", [value.real, value.imag]]
    if t is Remote:
        return ["p", value.__name__]
    raise TypeError(f"cannot pass a {t.__name__} to the candidate's process (plain data only)")


def decode(obj: Any, depth: int = 0) -> Any:
    """Rebuild an answer from builtin types only; anything else is a `ValueError`."""
    t = type(obj)
    if t in _SCALARS:
        return obj
    if depth > MAX_DEPTH or t is not list or len(obj) != 2 or type(obj[0]) is not str:
        raise ValueError("not plain data")
    tag, x = obj
    if tag in _KINDS and type(x) is list:
        return _KINDS[tag](decode(y, depth + 1) for y in x)
    if tag == "d" and type(x) is list and all(type(p) is list and len(p) == 2 for p in x):
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in x}
    if tag == "b" and type(x) is str:
        return bytes.fromhex(x)
    if tag == "c" and type(x) is list and len(x) == 2 and all(type(p) in (int, float) for p in x):
        return complex(*x)
    raise ValueError(f"unknown tag {tag[:20]!r}")


def _exception(name: Any, message: Any) -> Exception:
    """The builtin exception of that name (not StopIteration: it would end a test's iteration, not fail
    it), else a CandidateError."""
    cls = getattr(builtins, name, None) if isinstance(name, str) else None
    text = message[:1000] if isinstance(message, str) else ""
    if isinstance(cls, type) and issubclass(cls, Exception) and cls not in (StopIteration, StopAsyncIteration):
        try:
            return cls(text)
        except Exception:  # noqa: BLE001 - types whose constructor wants other arguments
            pass
    return CandidateError(f"{str(name)[:100]}: {text}")


# --------------------------------------------------------------------------------------------- the channel
class _Channel:
    """Newline-delimited JSON to and from the sandbox's server; every wait is bounded by the run's deadline.
    After a malformed answer or the end of the process, every request fails (`broken` says why)."""

    def __init__(self, proc: subprocess.Popen, deadline: float):
        self.deadline = deadline
        self.wfd, self.rfd = proc.stdin.fileno(), proc.stdout.fileno()
        os.set_blocking(self.wfd, False)
        self.buffer = bytearray()
        self.broken = ""

    def _wait(self, fd: int, event: int) -> None:
        poller = select.poll()
        poller.register(fd, event)
        left = self.deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            raise _Timeout

    def _break(self, why: str) -> _Broken:
        self.broken = self.broken or why
        return _Broken(self.broken)

    def send(self, message: Any) -> None:
        if self.broken:
            raise _Broken(self.broken)
        data = memoryview((repr(message) + "\n").encode())  # a literal of plain data: see _SERVER
        while data:
            self._wait(self.wfd, select.POLLOUT)
            try:
                data = data[os.write(self.wfd, data):]
            except BlockingIOError:
                continue
            except OSError:
                raise self._break("the candidate's process ended") from None

    def receive(self) -> Any:
        if self.broken:
            raise _Broken(self.broken)
        start = 0
        while (end := self.buffer.find(b"\n", start)) < 0:
            if len(self.buffer) > MAX_MESSAGE:
                raise self._break(f"an answer over {MAX_MESSAGE >> 20} MiB")
            start = len(self.buffer)
            self._wait(self.rfd, select.POLLIN)
            chunk = os.read(self.rfd, 1 << 16)
            if not chunk:
                raise self._break("the candidate's process ended")
            self.buffer += chunk
        line = bytes(self.buffer[:end])
        del self.buffer[:end + 1]
        try:
            return json.loads(line)
        except (ValueError, RecursionError):
            raise self._break("the candidate's process sent a malformed answer") from None

    def request(self, message: Any) -> Any:
        """Send, then the answer's value; the candidate's exception is raised here."""
        self.send(message)
        reply = self.receive()
        if type(reply) is list and len(reply) == 2 and reply[0] == "ok":
            return reply[1]
        if type(reply) is list and len(reply) == 3 and reply[0] == "raise":
            raise _exception(reply[1], reply[2])
        raise self._break("the candidate's process sent a malformed answer")

    def call(self, name: str, args: tuple, kwargs: dict) -> Any:
        value = self.request(["call", name, encode(list(args)), encode(kwargs)])
        try:
            return decode(value)
        except (ValueError, TypeError, RecursionError):  # unhashable set members and dict keys included
            raise self._break("the candidate's process sent a malformed answer") from None


class Remote:
    """One of the candidate's functions: a call runs it in the sandbox and returns its plain-data result."""

    def __init__(self, channel: _Channel, name: str):
        self._channel = channel
        self.__name__ = self.__qualname__ = name

    def __call__(self, *args, **kwargs):
        return self._channel.call(self.__name__, args, kwargs)

    def __repr__(self) -> str:
        return f"<candidate function {self.__name__}>"


def _exports(channel: _Channel, listing: Any, entry_point: str | None) -> dict[str, Any]:
    """The names the tests see: the candidate's functions (proxies), plain values and standard modules;
    never dunder or builtin names (bar the entry point)."""
    if type(listing) is not list or len(listing) > 10_000:
        raise channel._break("the candidate's process sent a malformed answer")
    names: dict[str, Any] = {}
    for entry in listing:
        if not (type(entry) is list and 2 <= len(entry) <= 3 and type(entry[0]) is str and entry[0].isidentifier()):
            raise channel._break("the candidate's process sent a malformed answer")
        name, kind, *rest = entry
        if name.startswith("__") or keyword.iskeyword(name) or (hasattr(builtins, name) and name != entry_point):
            continue
        if kind == "f":
            names[name] = Remote(channel, name)
        elif kind == "v" and rest:
            try:
                names[name] = decode(rest[0])
            except (ValueError, TypeError, RecursionError):
                raise channel._break("the candidate's process sent a malformed answer") from None
        elif kind == "m" and rest and type(rest[0]) is str and rest[0].partition(".")[0] in _STDLIB:
            try:
                names[name] = __import__(rest[0], fromlist=["_"])
            except ImportError:
                pass
    return names


# --------------------------------------------------------------------------------------------- grading
def _passes(test: Callable[[], object]) -> bool:
    """Whether one test runs without raising (the deadline and Ctrl-C propagate)."""
    try:
        test()
        return True
    except (_Timeout, KeyboardInterrupt):
        raise
    except BaseException:  # noqa: BLE001 - a failed assert, a candidate's exception, its broken process
        return False


def _grade(channel: _Channel, code: str, body: list[ast.stmt], entry_point: str | None) -> tuple[int, int, str]:
    """(passed, total, what went wrong) for the tests in `body` against the sandboxed `code`."""
    try:
        if channel.receive() != ["ready"]:
            raise _NotStarted("unexpected first message")
    except _Broken as e:
        raise _NotStarted(str(e)) from None
    asserts = sum(isinstance(n, ast.Assert) for n in body)
    try:
        names = _exports(channel, channel.request(["load", code]), entry_point)
    except _Broken as e:
        return 0, max(1, asserts), str(e)
    except Exception as e:  # noqa: BLE001 - the candidate's code raised while loading
        return 0, max(1, asserts), f"the code raised {type(e).__name__}: {str(e)[:200]}"
    ns: dict[str, Any] = {"__name__": "__test__", **names}
    passed = total = 0
    for node in body:
        ok = _passes(lambda n=node: exec(compile(ast.Module(body=[n], type_ignores=[]), "<test>", "exec"), ns))
        if isinstance(node, ast.Assert):
            total += 1
            passed += ok
        elif not ok:
            break
    check, candidate = ns.get("check"), names.get(entry_point or "")  # a `check` that is a Remote is the candidate's
    if entry_point and callable(check) and not isinstance(check, Remote) and isinstance(candidate, Remote):
        total += 1
        passed += _passes(lambda: check(candidate))
    return passed, total, channel.broken


def _tail(file) -> str:
    file.seek(0)
    lines = file.read(1 << 16).decode(errors="replace").strip().splitlines()
    return lines[-1][:200] if lines else "no output"


def run_code_tests(code: str, tests: str, timeout: float = 10.0, *, entry_point: str | None = None,
                   partial: bool = False, memory_mb: int = 512) -> Verdict:
    """Run `code` sandboxed, then `tests` here against it: each top-level `assert` is one test, and with
    `entry_point`, a `check(candidate)` the tests define (HumanEval) is one more. Score: all-or-nothing, or
    the passed fraction (`partial`). `timeout` bounds the whole run. `error` when no sandbox can be started
    here (`sandbox_unavailable()` says why) or the tests do not parse."""
    problem = sandbox_unavailable()
    if problem:
        return Verdict(0.0, "error", None, problem)
    try:
        body = ast.parse(tests).body
    except (SyntaxError, ValueError) as e:
        return Verdict(0.0, "error", None, f"the tests do not parse: {e}")
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryFile() as err:
        try:
            box = Sandbox([sandbox_python(), "-I", "-c", _SERVER], Limits(seconds=timeout, memory_mb=memory_mb),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        except (OSError, subprocess.SubprocessError) as e:
            return Verdict(0.0, "error", None, f"the sandbox did not start: {e}")
        with box:
            try:
                passed, total, broken = _grade(_Channel(box.proc, deadline), code, body, entry_point)
            except _Timeout:
                return Verdict(0.0, "timeout", None, f"no result within {timeout:g}s")
            except _NotStarted:
                box.kill()  # bwrap's own message is complete once it has exited
                return Verdict(0.0, "error", None, f"the sandbox did not start: {_tail(err)}")
    score = passed / total if partial and total else float(passed == total and total > 0 and not broken)
    status = "correct" if total and passed == total and not broken else "wrong"
    return Verdict(score, status, None, f"{passed}/{total} tests passed" + (f"; {broken}" if broken else ""))


def run_io_tests(code: str, cases: list[tuple[str, str]], timeout: float = 10.0, *, partial: bool = False,
                 memory_mb: int = 512) -> Verdict:
    """Run `code` as a sandboxed program once per (stdin, expected stdout) case; outputs compared here line by
    line, trailing whitespace ignored. `timeout` is per case."""
    problem = sandbox_unavailable()
    if problem:
        return Verdict(0.0, "error", None, problem)
    if "\0" in code or len(code.encode()) >= MAX_ARG:
        why = "the program has a NUL byte or is over 128 KiB"
        return Verdict(0.0, "wrong", None, f"0/{len(cases)} cases passed; {why}")
    limits = Limits(seconds=timeout, memory_mb=memory_mb)
    passed = 0
    for given, expected in cases:
        try:
            out, timed_out = run_program([sandbox_python(), "-I", "-c", code], given.encode(), limits)
        except (OSError, subprocess.SubprocessError) as e:
            return Verdict(0.0, "error", None, f"the sandbox did not start: {e}")
        if timed_out and not partial:
            return Verdict(0.0, "timeout", None, f"a case ran past {timeout:g}s")
        passed += not timed_out and _lines(out.decode(errors="replace")) == _lines(expected)
    total = len(cases)
    score = passed / total if partial and total else float(passed == total and total > 0)
    return Verdict(score, "correct" if total and passed == total else "wrong", None, f"{passed}/{total} cases passed")


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S)


def extract_code(response: str) -> str:
    """The last fenced code block, else the whole response."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response
