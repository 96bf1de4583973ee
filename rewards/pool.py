"""Score in worker processes with a hard wall-clock and memory limit per item, and no network.

Not threads and not `signal.alarm` (neither can stop sympy stuck in C code, and alarm only works on the
main thread): each item goes to a worker process; a worker past its deadline is killed and replaced, and
the item comes back as a `timeout` verdict. A worker that dies (memory limit, crash) yields an `error`
verdict. The caller always gets one verdict per item, in order, within about `timeout` per item.

Every reward, math included, runs under the limits code gets on wall clock, memory and network: each
worker first moves into a network namespace of its own (no interface but a loopback that is down), so no
reward can reach the network or a service of this machine; a pool that cannot do that refuses to start
(`PoolError`, one line). The workers are not otherwise sandboxed: they read and write files as this user.
Code rewards run the model's code in their own sandbox on top (rewards/sandbox.py).

A worker imports a reward's module before its first item's clock starts: importing a reward's dependencies
(if-verifiable pulls in `datasets`: 1.3-1.6 s, langdetect's first use 0.7 s) is not the item's time.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import multiprocessing as mp
import os
import resource
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any

from dspost.rewards.verdict import Verdict

IMPORT_TIMEOUT = 120.0  # seconds for a worker to import a reward's module (torch-heavy rewards take ~10 s)


class PoolError(RuntimeError):
    """The scoring pool cannot run here (its workers cannot be cut off the network); one line."""

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
START_TIMEOUT = 60.0  # seconds for a worker to say it is ready (the first one starts the forkserver)


def isolate_network() -> str | None:
    """Move this process into a new network namespace; None, or the one-line reason it could not. As root
    that is `unshare(CLONE_NEWNET)`; otherwise a user namespace comes with it, mapping only the user's own
    uid and gid (so files and the code sandbox behave as before). Call it while single-threaded."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNET if uid == 0 else CLONE_NEWUSER | CLONE_NEWNET
    if libc.unshare(flags) != 0:
        what = "CLONE_NEWNET" if uid == 0 else "CLONE_NEWUSER|CLONE_NEWNET"
        return f"unshare({what}) failed: {os.strerror(ctypes.get_errno())}"
    if uid != 0:
        try:
            for file, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{file}", "w") as f:
                    f.write(text)
        except OSError as e:
            return f"mapping the user namespace failed: {e}"
    return None


def _worker(conn: Connection, memory_bytes: int | None) -> None:
    problem = isolate_network()
    conn.send(problem or "ready")
    if problem:
        return
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cache: dict[str, Any] = {}
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        if len(task) == 2:  # ("load", target): import it now, outside any item's deadline
            try:
                cache[task[1]] = _load(task[1])
                conn.send("ok")
            except Exception as e:  # noqa: BLE001 - reported to the pool as the reason every item fails
                conn.send(f"cannot load reward {task[1]}: {type(e).__name__}: {e}")
            continue
        target, args, kwargs = task
        try:
            if target not in cache:
                cache[target] = _load(target)
            result = cache[target](*args, **kwargs)
        except MemoryError:
            result = Verdict(0.0, "error", None, "memory limit exceeded")
        except Exception as e:  # noqa: BLE001 - the scorer's failure is reported, never raised into the pool
            result = Verdict(0.0, "error", None, f"{type(e).__name__}: {e}")
        try:
            conn.send(result)
        except (TypeError, AttributeError, ValueError) as e:  # pickling failed: a result that cannot be sent
            conn.send(Verdict(0.0, "error", None, f"the reward returned what cannot be sent: {e}"))


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


class ScoringPool:
    """A fixed number of worker processes; `map` runs `module:function` over argument tuples."""

    def __init__(self, workers: int = 2, memory_mb: int | None = 2048):
        self.n = workers
        self.memory = memory_mb * 2**20 if memory_mb else None
        # forkserver: workers start from a clean process, not a copy of a driver holding models and threads.
        self.ctx = mp.get_context("forkserver")
        self.procs: list[tuple[mp.Process, Connection] | None] = [None] * workers
        self.loaded: list[set[str]] = [set() for _ in range(workers)]  # the targets each worker has imported
        self.restarts = 0
        try:  # all workers now: a pool that cannot isolate them refuses here, before any scoring
            for i in range(workers):
                self._spawn(i)
        except BaseException:
            self.close()
            raise

    def _spawn(self, i: int) -> tuple[mp.Process, Connection]:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(child, self.memory), daemon=True)
        proc.start()
        child.close()
        self.procs[i] = (proc, parent)
        try:
            ready = parent.recv() if parent.poll(START_TIMEOUT) else f"no answer within {START_TIMEOUT:g}s"
        except (EOFError, OSError):
            ready = f"it exited at start (exit code {proc.exitcode})"
        if ready != "ready":
            self._kill(i)
            raise PoolError(f"scoring pool: a worker did not start cut off the network: {ready}")
        self.loaded[i] = set()
        return self.procs[i]

    def _load(self, target: str) -> str | None:
        """Every worker imports `target` (once each); the reason it cannot, else None."""
        waiting = {}
        for i in range(self.n):
            proc, conn = self.procs[i] or self._spawn(i)
            if target not in self.loaded[i]:
                conn.send(("load", target))
                waiting[conn] = i
        deadline = time.monotonic() + IMPORT_TIMEOUT
        while waiting:
            ready = wait(list(waiting), timeout=max(deadline - time.monotonic(), 0))
            if not ready:
                for i in waiting.values():
                    self._kill(i)
                return f"cannot load reward {target}: no answer within {IMPORT_TIMEOUT:g}s"
            for conn in ready:
                i = waiting.pop(conn)
                try:
                    answer = conn.recv()
                except (EOFError, OSError):
                    answer = f"cannot load reward {target}: the scoring worker died"
                    self._kill(i)
                if answer != "ok":
                    return answer
                self.loaded[i].add(target)
        return None

    def _kill(self, i: int) -> None:
        proc, conn = self.procs[i]
        proc.kill()
        proc.join(5)
        conn.close()
        self.procs[i] = None
        self.restarts += 1

    def map(self, target: str, items: list[tuple], timeout: float, kwargs: dict | None = None) -> list[Verdict]:
        if not items:
            return []
        problem = self._load(target)
        if problem is not None:
            return [Verdict(0.0, "error", None, problem) for _ in items]
        results: list[Verdict | None] = [None] * len(items)
        todo = deque(range(len(items)))
        busy: dict[int, tuple[int, float]] = {}  # worker -> (item, deadline)
        while todo or busy:
            for i in range(self.n):
                if i not in busy and todo:
                    if self.procs[i] is None:  # a replaced worker imports the target before its item's clock
                        self._spawn(i)
                        problem = self._load(target)
                        if problem is not None:
                            for item in todo:
                                results[item] = Verdict(0.0, "error", None, problem)
                            todo.clear()
                            continue
                    proc, conn = self.procs[i]
                    item = todo.popleft()
                    conn.send((target, items[item], kwargs or {}))
                    busy[i] = (item, time.monotonic() + timeout)
            conns = {self.procs[i][1]: i for i in busy}
            next_deadline = min(d for _, d in busy.values())
            for conn in wait(list(conns), timeout=max(next_deadline - time.monotonic(), 0)):
                i = conns[conn]
                item, _ = busy.pop(i)
                try:
                    results[item] = conn.recv()
                except (EOFError, OSError):  # the worker died: memory limit, crash, or a killed child
                    results[item] = Verdict(0.0, "error", None, "scoring worker died")
                    self._kill(i)
            now = time.monotonic()
            for i, (item, deadline) in list(busy.items()):
                if now >= deadline:
                    results[item] = Verdict(0.0, "timeout", None, f"no answer within {timeout:g}s")
                    busy.pop(i)
                    self._kill(i)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for i, slot in enumerate(self.procs):
            if slot is not None:
                proc, conn = slot
                try:
                    conn.send(None)
                except OSError:
                    pass
                proc.join(1)
                if proc.is_alive():
                    proc.kill()
                self.procs[i] = None

    def __enter__(self) -> "ScoringPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@functools.lru_cache(maxsize=1)
def pool_unavailable() -> str | None:
    """None when scoring workers start here cut off the network, else the one-line reason. A pre-flight for
    recipe checks, before anything else starts (one throwaway worker, ~0.1 s, once per process)."""
    try:
        ScoringPool(1, memory_mb=None).close()
    except PoolError as e:
        return str(e)
    return None


def verify_math_batch(pairs: list[tuple[str, str]], timeout: float = 5.0, workers: int = 2,
                      pool: ScoringPool | None = None, **options) -> list[Verdict]:
    """Grade (response, gold) pairs in worker processes, each within `timeout` seconds; verdicts in order."""
    own = pool is None
    pool = pool or ScoringPool(workers)
    try:
        return pool.map("dspost.rewards.math:verify_math", [tuple(p) for p in pairs], timeout, options)
    finally:
        if own:
            pool.close()
