"""vLLM (CPU, compiled mode) serves a checkpoint we saved: same greedy tokens, same logprobs."""

import pytest
import torch

pytestmark = pytest.mark.vllm

# Measured here (fp32, compiled mode): mean |d logprob| ~2e-7, max ~1e-6.
LOGPROB_TOL = 1e-4


def test_vllm_greedy_tokens_and_logprobs_match(vllm_engine, served_checkpoint):
    from vllm import SamplingParams

    _, model = served_checkpoint
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (5, 9, 17, 30)]
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=0, detokenize=False)
    outs = vllm_engine.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ours = model.generate(prompts, 16)
    diffs = []
    for p, o, ref in zip(prompts, outs, ours):
        toks = list(o.outputs[0].token_ids)
        assert toks == ref
        vllm_lp = torch.tensor([o.outputs[0].logprobs[i][t].logprob for i, t in enumerate(toks)])
        with torch.no_grad():
            lp = model(torch.tensor([p + toks])).logits[0, len(p) - 1:-1].float().log_softmax(-1)
        diffs.append((lp.gather(1, torch.tensor(toks)[:, None])[:, 0] - vllm_lp).abs())
    d = torch.cat(diffs)
    print(f"logprob |diff| mean {d.mean():.2e} max {d.max():.2e}")
    assert d.max() <= LOGPROB_TOL


def test_vllm_serves_tiny_dense_with_our_tokens_and_logprobs(tmp_path):
    """The dense preset (every layer dense, no MTP: the OPD dense student) is served by vLLM's CPU backend as our
    model computes it: the same greedy tokens (decode reads MLA's absorbed weights) and prefill logprobs. A fresh
    engine in its own process (vLLM keeps process-global state per engine; the session engine serves tiny-math)."""
    pytest.importorskip("vllm")
    import json
    import subprocess
    import sys

    from dspost.model import DeepseekV3, tiny_dense

    model = DeepseekV3(tiny_dense()).init_weights(5).eval()
    assert not model.moe_layers() and not model.model.mtp_layers  # dense all through
    model.save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (7, 19, 33)]
    code = ("import json, sys; from dspost.rollout.engine import VLLMEngine, SamplingConfig; "
            "e = VLLMEngine(sys.argv[1], max_model_len=256, kv_cache_gb=1); s = json.loads(sys.argv[2]); "
            "out = e.generate([x[:6] for x in s], SamplingConfig(n=1, temperature=0.0, max_tokens=12), 0, seed=0); "
            "print('RESULT' + json.dumps([e.sequence_logprobs(s), [o.response_ids for o in out]]))")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path), json.dumps(seqs)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    served, greedy = json.loads(next(ln for ln in run.stdout.splitlines() if ln.startswith("RESULT"))[6:])
    assert greedy == model.generate([s[:6] for s in seqs], 12)
    diffs = []
    with torch.no_grad():
        for s, lp in zip(seqs, served):
            ours = model(torch.tensor([s])).logits[0, :-1].float().log_softmax(-1)
            diffs.append((ours.gather(1, torch.tensor(s[1:])[:, None])[:, 0] - torch.tensor(lp)).abs())
    d = torch.cat(diffs)
    print(f"tiny-dense logprob |diff| mean {d.mean():.2e} max {d.max():.2e}")
    assert d.max() <= LOGPROB_TOL
