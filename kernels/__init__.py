"""FP8/FP4 ops. Each op has a plain-torch reference (`reference.py`); Triton versions dispatch on CUDA."""

from dspost.kernels.reference import act_quant, weight_dequant, weight_quant

__all__ = ["act_quant", "weight_quant", "weight_dequant"]
