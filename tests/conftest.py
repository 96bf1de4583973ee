import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def shared_data() -> Path | None:
    """The shared data sets (GSM8K, MATH-500, ...): $DSPOST_SHARED_DATA, or ../shared/data beside the repo."""
    env = os.environ.get("DSPOST_SHARED_DATA")
    for p in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if p.is_dir():
            return p
    return None


@pytest.fixture
def data_dir() -> Path:
    d = shared_data()
    if d is None:
        pytest.skip("shared data sets not present")
    return d


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Never touch the user's ~/.cache from tests.
    if "DSPOST_CACHE" not in os.environ:
        monkeypatch.setenv("DSPOST_CACHE", str(tmp_path_factory.getbasetemp() / "dspost-cache"))


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory):
    """A random tiny-math-shaped checkpoint (non-zero router bias, group-limited routing) for vLLM tests."""
    import torch

    from dspost.model import DeepseekV3, tiny_math

    model = DeepseekV3(tiny_math()).init_weights(3)
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.gate.e_score_correction_bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("served")
    model.save_pretrained(path)
    return path, model.eval()


@pytest.fixture(scope="session")
def vllm_engine(served_checkpoint):
    """One in-process vLLM CPU engine (ours, with the weight-sync extension) per test session: start-up
    costs ~30-70 s. Tests that change its weights must restore them."""
    pytest.importorskip("vllm")
    from dspost.rollout.engine import VLLMEngine

    path, _ = served_checkpoint
    engine = VLLMEngine(str(path), max_model_len=512, kv_cache_gb=1)
    yield engine
    del engine


def fresh_engine_logprobs(path, seqs) -> list[list[float]]:
    """A freshly started engine in its own process (vLLM keeps process-global state per engine)."""
    import json
    import subprocess
    import sys

    code = ("import json, sys; from dspost.rollout.engine import VLLMEngine; "
            "e = VLLMEngine(sys.argv[1], max_model_len=256, kv_cache_gb=1); "
            "print('RESULT' + json.dumps(e.sequence_logprobs(json.loads(sys.argv[2]))))")
    out = subprocess.run([sys.executable, "-c", code, str(path), json.dumps(seqs)], capture_output=True, text=True,
                         check=True)
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))[6:])
