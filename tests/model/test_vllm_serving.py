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
