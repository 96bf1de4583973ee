import os
import sys

import pytest

# Triton kernels run on the CPU through Triton's interpreter, which Triton reads when it is first imported.
# Without a GPU, turn it on before anything imports Triton (nothing else in the suite uses Triton on CPU).
_CUDA = os.path.exists("/proc/driver/nvidia/gpus") and any(os.scandir("/proc/driver/nvidia/gpus"))
if not _CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_ops():
    """The Triton launchers, on CUDA when there is a GPU, else in the interpreter (CPU tensors)."""
    pytest.importorskip("triton")
    if not _CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton was imported before the interpreter could be turned on")
    from dspost.kernels import triton_ops

    return triton_ops


@pytest.fixture
def device():
    return "cuda" if _CUDA else "cpu"


@pytest.fixture
def seed(request):
    """A fresh seed per test run (printed on failure), so kernels meet new inputs every time."""
    import random

    s = random.randrange(2**31)
    request.node.user_properties.append(("seed", s))
    return s
