"""torch.compile for training, applied from outside the model (torchtitan's `apply_compile` pattern).

Each transformer block's training forward (and so its backward) is compiled; the routed experts run eager
inside it, because their per-expert row counts change every step (compiling them would recompile each step).
Forwards without autograd (evaluation, generation, parity probes) stay eager: their shapes (one-token decode
steps, growing caches) would fill the compiled cache with graphs used once."""

from __future__ import annotations

import torch
from torch import nn

from dspost.model.deepseek_v3 import Block, RoutedExperts


def _training_only(module: nn.Module) -> None:
    eager = module.forward
    # Dynamic from the start: padding-free rows change length every step, and dims found dynamic one at a time
    # each cost a mid-run recompile of seconds (the steady step time is about the same either way).
    compiled = torch.compile(eager, dynamic=True)

    def forward(*args, **kwargs):
        return compiled(*args, **kwargs) if torch.is_grad_enabled() else eager(*args, **kwargs)

    module.forward = forward


def apply_compile(model: nn.Module) -> int:
    """Compile the blocks of our DeepseekV3 (possibly under a PEFT or reward-head wrapper) in place; returns
    how many were compiled (0 means `model` holds none of ours)."""
    n = 0
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            module.forward = torch.compiler.disable(module.forward)
        if isinstance(module, Block):
            _training_only(module)
            n += 1
    return n
