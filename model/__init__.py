"""The DeepSeek MoE family: `from_pretrained`, the presets (`tiny_math`, `tiny_dense`), and the checkpoint contract
with HF and vLLM."""

from dspost.model.checkpoint import (CheckpointError, check_vllm_servable, from_pretrained, hf_tensors,
                                     save_pretrained)
from dspost.model.compile import apply_compile
from dspost.model.deepseek_v3 import DeepseekV3, ModelArgs, ModelOutput, mtp_horizon_weights
from dspost.model.presets import PRESETS, tiny_dense, tiny_math
from dspost.model.tokenizer import build_tokenizer, load_tokenizer

__all__ = [
    "CheckpointError", "apply_compile", "DeepseekV3", "ModelArgs", "ModelOutput", "PRESETS", "build_tokenizer",
    "check_vllm_servable", "from_pretrained", "hf_tensors", "load_tokenizer", "mtp_horizon_weights",
    "save_pretrained", "tiny_dense", "tiny_math",
]
