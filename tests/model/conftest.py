import pytest
import torch

from dspost.model import DeepseekV3, tiny_math


def small_args(**kw):
    """tiny-math's shape, shrunk where the CPU MLA kernel does not care (tests that do not start vLLM)."""
    base = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                v_head_dim=16, vocab_size=97, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2)
    base.update(kw)
    return tiny_math(**base)


def random_model(args, seed=0, bias_std=0.05):
    model = DeepseekV3(args).init_weights(seed)
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.gate.e_score_correction_bias.normal_(0, bias_std, generator=torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.fixture
def tiny():
    return random_model(small_args())
