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


def tiny_dense(**overrides) -> ModelArgs:
    """tiny-math with every layer dense (`first_k_dense_replace = num_hidden_layers`), as DeepSeek-V3.5's dense
    variant beside the MoE: the OPD dense student. Each layer's SwiGLU is 384 wide, the width a tiny-math MoE layer
    activates per token (2 routed + 1 shared expert x 128), so it has 3.28M parameters against tiny-math's 3.39M
    activated (5.16M in all; tiny-math's one dense layer is 512 wide). No MTP layer: at index num_hidden_layers
    it would be a MoE block (`first_k_dense_replace` counts it), and vLLM serves the main stack only. Same
    attention shapes (vLLM's CPU MLA kernel: kv_lora_rank + qk_rope_head_dim = 576), vocabulary and tokenizer."""
    layers = overrides.pop("num_hidden_layers", 4)  # stays all dense at any depth
    args = tiny_math(num_hidden_layers=layers, first_k_dense_replace=layers, intermediate_size=384,
                     num_nextn_predict_layers=0)
    return args.replace(**overrides)


PRESETS = {"tiny-math": tiny_math, "tiny-dense": tiny_dense}
