import torch

from tests.model.conftest import random_model, small_args


def test_cached_decode_matches_full_forward(tiny):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [3]]
    outs = tiny.generate(prompts, 8)
    with torch.no_grad():
        for p, new in zip(prompts, outs):
            logits = tiny(torch.tensor([p + new])).logits[0]
            assert logits[len(p) - 1:-1].argmax(-1).tolist() == new


def test_absorbed_attention_equals_naive_logits():
    model = random_model(small_args(rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8,
                                                  "mscale_all_dim": 1.0}))
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    from dspost.model.deepseek_v3 import KVCache

    cache = KVCache.empty(model.args, 2, 12, "cpu", torch.float32)
    with torch.no_grad():
        cached = model._decode_step(ids, torch.ones(2, 12, dtype=torch.bool), cache)
        full = model(ids).logits
    assert (cached - full).abs().max() < 1e-4


def test_eos_stops_generation(tiny):
    first = tiny.generate([[1, 2, 3]], 1)[0][0]
    assert tiny.generate([[1, 2, 3]], 10, eos_token_id=first)[0] == [first]


def test_sampling_is_seeded(tiny):
    a = tiny.generate([[4, 5]], 6, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = tiny.generate([[4, 5]], 6, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert a == b
