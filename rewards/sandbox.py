"""Start untrusted programs in a bubblewrap sandbox, with limits, and make sure nothing of them outlives the run.

Each sandbox gets its own user, PID, IPC, network, mount, UTS and cgroup namespaces (`bwrap --unshare-all`):
it sees only its own processes (its /proc is private), its own SysV IPC, only a loopback interface of its
own, and a file system made of read-only /usr (with the /bin, /lib, ... links a merged-/usr system needs),
a private /proc and minimal /dev, and size-capped tmpfs on /tmp and /dev/shm; the rest of / is read-only
and empty, and all of it disappears with the sandbox. Nothing runs as root outside: started as root, the
launcher drops to `nobody` before it executes bwrap; otherwise it keeps the user's own uid, seen as
`nobody` through the user namespace. The sandboxed program has no capabilities, cannot create further user
namespaces (`--disable-userns`), and gets only the descriptors it is handed (stdin, stdout, stderr).

Cleanup never depends on the caller surviving: `--die-with-parent` kills the sandbox's init when the
process that started bwrap dies (a scoring worker SIGKILLed at its deadline included), and the kernel kills
every process of a PID namespace when its init dies, `setsid` or not.

Limits: wall clock (the caller kills the sandbox), address space, CPU seconds, file size, open files, no
core files (rlimits set before bwrap starts, inherited by every process); processes: RLIMIT_NPROC set
inside the sandbox by `prlimit`, which this kernel counts per user namespace (measured on 6.18: two
concurrent sandboxes with a limit of 20 each forked 18 children each; the same limit set outside, before
bwrap, was shared by every process of the uid, 12 + 0). Where this process may create cgroups (root on
cgroup v1 here, or a delegated v2 subtree), each sandbox also gets its own pids and memory cgroup: the
memory limit then covers the whole process tree and its tmpfs pages, which rlimits cannot.
"""

from __future__ import annotations

import functools
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
CGROUP_PREFIX = "dspost-sandbox-"
_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")


@dataclass(frozen=True)
class Limits:
    """Per-sandbox limits. `memory_mb` bounds each process's address space (and, with a cgroup, the whole
    tree with its tmpfs files); `seconds` is the wall clock the caller enforces, CPU time gets one more."""

    seconds: float
    memory_mb: int = 512
    processes: int = 64
    file_mb: int = 16
    tmp_mb: int = 64
    shm_mb: int = 16
    open_files: int = 256

    def rlimits(self) -> list[tuple[int, int]]:
        """(resource, value) pairs, soft = hard, for every process of the sandbox."""
        return [(resource.RLIMIT_AS, self.memory_mb << 20), (resource.RLIMIT_CPU, int(self.seconds) + 1),
                (resource.RLIMIT_FSIZE, self.file_mb << 20), (resource.RLIMIT_CORE, 0),
                (resource.RLIMIT_NOFILE, self.open_files)]


# --------------------------------------------------------------------------------------------- finding tools
def _bwrap() -> str | None:
    return shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")


def sandbox_python() -> str | None:
    """The interpreter that runs inside: this one when it lies under /usr (the only tree the sandbox sees),
    else the system's python3. Candidates need only the standard library."""
    real = os.path.realpath(sys.executable)
    for path in (real, *_PYTHONS):
        if path.startswith("/usr/") and os.access(path, os.X_OK):
            return path
    return None


def _root_links() -> list[str]:
    """bwrap arguments that recreate /bin, /lib, /lib64, /sbin: links into /usr on merged-/usr systems,
    read-only binds where they are real directories."""
    args: list[str] = []
    for name in ("bin", "lib", "lib64", "sbin"):
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def bwrap_argv(bwrap: str, command: list[str], limits: Limits) -> list[str]:
    """The bwrap command line that runs `command` (a program under /usr) with a process limit set inside."""
    return [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--ro-bind", "/usr", "/usr", *_root_links(), "--proc", "/proc", "--dev", "/dev",
            "--size", str(limits.shm_mb << 20), "--tmpfs", "/dev/shm",
            "--size", str(limits.tmp_mb << 20), "--tmpfs", "/tmp",
            "--remount-ro", "/dev", "--remount-ro", "/",
            "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "sandbox", "--chdir", "/tmp",
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "LANG", "C.UTF-8", "--",
            "/usr/bin/prlimit", f"--nproc={limits.processes}", "--", *command]


# --------------------------------------------------------------------------------------------- cgroups
def _cgroup_dirs() -> dict[str, Path]:
    """controller ("pids", "memory") -> this process's cgroup directory for it (v1 hierarchy, or v2 where the
    controller is enabled for children)."""
    found: dict[str, Path] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        for c in controllers.split(",") if controllers else []:
            if c in ("pids", "memory") and Path("/sys/fs/cgroup", c, rel).is_dir():
                found[c] = Path("/sys/fs/cgroup", c, rel)
        if not controllers and Path("/sys/fs/cgroup/cgroup.controllers").is_file():
            base = Path("/sys/fs/cgroup", rel)
            try:
                enabled = (base / "cgroup.subtree_control").read_text().split()
            except OSError:
                enabled = []
            for c in ("pids", "memory"):
                if c in enabled:
                    found.setdefault(c, base)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@functools.lru_cache(maxsize=None)
def _cgroup_bases(euid: int) -> tuple[tuple[str, Path], ...]:
    """The controllers this process may create cgroups for, once per process (and user). Also removes the
    cgroups left empty by sandbox owners killed before they could (rmdir only: a cgroup with processes in
    it is never touched, whoever owns it)."""
    bases = []
    for controller, base in _cgroup_dirs().items():
        if not os.access(base, os.W_OK):
            continue
        for stale in base.glob(CGROUP_PREFIX + "*"):
            owner = stale.name[len(CGROUP_PREFIX):].split("-")[0]
            if owner.isdigit() and not _alive(int(owner)):
                try:
                    stale.rmdir()
                except OSError:
                    pass
        bases.append((controller, base))
    return tuple(bases)


def _limit_files(controller: str, limits: Limits) -> list[tuple[str, str, bool]]:
    """(file, value, required) for a controller; a v1 or v2 file, whichever exists, sets the limit."""
    if controller == "pids":
        return [("pids.max", str(limits.processes + 4), True)]  # + bwrap, its init, prlimit's exec, slack
    total = (limits.memory_mb + limits.tmp_mb + limits.shm_mb + 32) << 20
    return [("memory.limit_in_bytes", str(total), True), ("memory.memsw.limit_in_bytes", str(total), False),
            ("memory.max", str(total), True), ("memory.swap.max", "0", False)]


def make_cgroups(limits: Limits) -> list[Path]:
    """One fresh cgroup per usable controller, limits written; [] where none can be made (not an error:
    the rlimits still hold, per process)."""
    made: list[Path] = []
    name = f"{CGROUP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    for controller, base in _cgroup_bases(os.geteuid()):
        path = base / name
        try:
            path.mkdir(exist_ok=True)
            wrote = False
            for file, value, required in _limit_files(controller, limits):
                if (path / file).exists():
                    (path / file).write_text(value)
                    wrote = wrote or required
            if not wrote:
                raise OSError(f"no limit file for {controller}")
        except OSError:
            _remove_cgroup(path, wait=0.0)
            continue
        if path not in made:
            made.append(path)
    return made


def _remove_cgroup(path: Path, wait: float = 2.0) -> None:
    """Kill what is left in the cgroup and remove it; a cgroup still busy after `wait` is left for the next
    process's stale sweep."""
    end = time.monotonic() + wait
    while True:
        try:
            for pid in (path / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() >= end:
                return
            time.sleep(0.002)


# --------------------------------------------------------------------------------------------- starting
def _enter(cgroups: list[Path], limits: Limits, drop: bool):
    """preexec_fn (runs in the child between fork and exec): join the cgroups, set the limits, and as root
    become `nobody` so that no sandbox process is root outside. Only os calls: the callers are the scoring
    workers, single-threaded."""
    procs = [str(c / "cgroup.procs") for c in cgroups]
    rlimits = limits.rlimits()

    def preexec() -> None:
        for path in procs:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
        for what, value in rlimits:
            resource.setrlimit(what, (value, value))
        if drop:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
    return preexec


class Sandbox:
    """`command` running in a fresh sandbox; the context manager kills it (the whole PID namespace) and
    removes its cgroups on exit. stdin/stdout/stderr as for `subprocess.Popen`."""

    def __init__(self, command: list[str], limits: Limits, stdin=None, stdout=None, stderr=None):
        bwrap = _bwrap()
        if bwrap is None:
            raise OSError("bubblewrap (bwrap) is not installed")
        self.cgroups = make_cgroups(limits)
        try:
            self.proc = subprocess.Popen(bwrap_argv(bwrap, command, limits), stdin=stdin, stdout=stdout,
                                         stderr=stderr, env={}, cwd="/", close_fds=True,
                                         preexec_fn=_enter(self.cgroups, limits, os.geteuid() == 0))
        except BaseException:
            self._remove_cgroups()
            raise

    def kill(self) -> None:
        """SIGKILL bwrap: its init dies with it (--die-with-parent) and takes the namespace's processes along."""
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        self._remove_cgroups()

    def _remove_cgroups(self) -> None:
        for path in self.cgroups:
            _remove_cgroup(path)
        self.cgroups = []

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def run_program(command: list[str], stdin: bytes, limits: Limits) -> tuple[bytes, bool]:
    """Run `command` sandboxed with `stdin`; returns (stdout, at most `limits.file_mb`; timed out). Output
    goes through temporary files, so a chatty program can neither block nor fill this process's memory."""
    with tempfile.TemporaryFile() as given, tempfile.TemporaryFile() as out:
        given.write(stdin)
        given.seek(0)
        with Sandbox(command, limits, stdin=given, stdout=out, stderr=subprocess.DEVNULL) as box:
            try:
                box.proc.wait(timeout=limits.seconds)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
        out.seek(0)
        return out.read((limits.file_mb << 20) + 1), timed_out


# --------------------------------------------------------------------------------------------- pre-flight
@functools.lru_cache(maxsize=None)
def _preflight(euid: int) -> str | None:
    if _bwrap() is None:
        return "code sandbox unavailable: bubblewrap (bwrap) is not installed (apt-get install bubblewrap)"
    python = sandbox_python()
    if python is None:
        return "code sandbox unavailable: no python3 under /usr to run candidates with (apt-get install python3)"
    try:
        with Sandbox([python, "-I", "-c", "print('ok')"], Limits(seconds=20), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE) as box:
            out, err = box.proc.communicate(timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"code sandbox unavailable: cannot start bubblewrap: {e}"
    if out.strip() != b"ok":
        lines = err.decode(errors="replace").strip().splitlines() or [f"exit status {box.proc.returncode}"]
        return f"code sandbox unavailable: bubblewrap failed: {lines[-1][:300]}"
    return None


def sandbox_unavailable() -> str | None:
    """None when sandboxes can be started here, else the one-line reason (checked once per process and user:
    bwrap present, user namespaces allowed, a trivial sandboxed python runs)."""
    return _preflight(os.geteuid())


def describe() -> str:
    """One line on what the sandbox has here (for `dspost doctor`)."""
    problem = sandbox_unavailable()
    if problem:
        return problem
    version = subprocess.run([_bwrap(), "--version"], capture_output=True, text=True).stdout.strip()
    controllers = [c for c, _ in _cgroup_bases(os.geteuid())]
    groups = (f"cgroup limits: {', '.join(controllers)}" if controllers else
              "no writable cgroup: processes limited per sandbox (RLIMIT_NPROC), memory per process (RLIMIT_AS)")
    return f"{version}, candidates run by {sandbox_python()}, {groups}"
