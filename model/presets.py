"""Named model configs."""

from dspost.model.deepseek_v3 import ModelArgs


def tiny_math(**overrides) -> ModelArgs:
    """A tiny DeepSeek-V3 that vLLM's CPU backend serves (its MLA kernel needs kv_lora_rank 512 +
    qk_rope_head_dim 64) and that trains quickly on 2 cores: 4 layers (1 dense), 8 experts in 4 groups,
    top-2 from 2 groups, one shared expert, one MTP layer, a 1024-token byte-level BPE vocabulary."""
    args = ModelArgs(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=512,
        qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=1.0, first_k_dense_replace=1,
        max_position_embeddings=2048, num_nextn_predict_layers=1, bos_token_id=None, eos_token_id=2,
        pad_token_id=0,
    )
    return args.replace(**overrides)


PRESETS = {"tiny-math": tiny_math}
