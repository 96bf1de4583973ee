"""Pieces every trainer shares: the LR schedule and the training checkpoint (model + optimizer + RNG)."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up to 1, then cosine down to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def save_training_checkpoint(path: Path, model, tokenizer, optimizer, step: int, extra: dict | None = None) -> Path:
    """HF-layout model (or PEFT adapter) + tokenizer + `trainer_state.pt`, written atomically into `path`."""
    from dspost.model import DeepseekV3
    from dspost.model.checkpoint import atomic_dir, write_checkpoint
    from dspost.model.reward_model import DeepseekV3RewardModel

    with atomic_dir(path) as tmp:
        if isinstance(model, DeepseekV3RewardModel):
            model.write(tmp, tokenizer=tokenizer)
        elif isinstance(model, DeepseekV3):
            write_checkpoint(model, tmp, tokenizer=tokenizer)
        else:  # a PEFT adapter (not the frozen base; a reward head included) or a transformers model
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "step": step,
                    **(extra or {})}, tmp / "trainer_state.pt")
    return path


def save_checkpoint(run, model, tokenizer, optimizer, step: int) -> Path:
    """A run's checkpoint of `step`, marked latest."""
    path = save_training_checkpoint(run.checkpoint_path(step), model, tokenizer, optimizer, step)
    run.mark_latest(step)
    run.log.info("saved %s", path)
    return path


def load_training_state(path: Path, optimizer) -> dict:
    state = torch.load(Path(path) / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state


def optimizer_and_start(model, t, resume_from: Path | None) -> tuple[torch.optim.Optimizer, int]:
    """AdamW over the trainable parameters, restored (with the RNG) when resuming; returns it and the step
    to continue from."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    if resume_from is None:
        return opt, 0
    return opt, load_training_state(resume_from, opt)["step"]


def set_lr(opt: torch.optim.Optimizer, t, step: int) -> None:
    for g in opt.param_groups:
        g["lr"] = t.lr * lr_factor(step, t.warmup_steps, t.max_steps, t.min_lr_ratio)


def compile_if_asked(model, t) -> None:
    """`trainer.compile`: compile the blocks of `model` in place (`apply_compile`), or say why it cannot."""
    from dspost.model import apply_compile

    if t.compile and not apply_compile(model):
        raise ValueError(f"trainer.compile: {type(model).__name__} holds none of dspost's DeepseekV3 modules; "
                         "compilation is implemented for deepseek_v3 checkpoints")
