"""The rollout engine's sampled-token logprobs are those of the distribution it sampled from, which is the
distribution the trainer computes at the rollout temperature."""

import pytest
import torch

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("temperature", [0.6, 1.3])
def test_sampled_logprobs_match_the_trainers_at_the_rollout_temperature(vllm_engine, served_checkpoint, temperature):
    from dspost.rollout.engine import SamplingConfig
    from dspost.trainer_worker import token_logprobs

    _, model = served_checkpoint
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (6, 13)]
    samples = vllm_engine.generate(prompts, SamplingConfig(n=3, temperature=temperature, max_tokens=12), 0, seed=5)
    tempered, untempered = [], []
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        span = slice(len(s.prompt_ids) - 1, ids.shape[1] - 1)
        with torch.no_grad():
            tempered.append(token_logprobs(model, ids, temperature=temperature)[0][0, span])
            untempered.append(token_logprobs(model, ids)[0][0, span])
    engine = torch.cat([torch.tensor(s.logprobs) for s in samples])
    assert (torch.cat(tempered) - engine).abs().max() <= 1e-4
    assert (torch.cat(untempered) - engine).abs().max() > 1e-2  # the temperature is visible in the logprobs
