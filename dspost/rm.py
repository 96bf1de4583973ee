"""`kind: rm`: a Bradley-Terry reward model, loss -log sigmoid(r_chosen - r_rejected), full or LoRA.

Our DeepSeek MoE with a scalar head (`dspost.model.reward_model`), saved in the layout transformers loads as
`DeepseekV3ForSequenceClassification`. Same machinery as SFT: AdamW with warm-up + cosine, gradient
accumulation and clipping, router-bias updates, held-out pair accuracy every `eval_every` steps, atomic
checkpoints and exact resume. With `trainer.lora`, the adapters and the head train (PEFT `modules_to_save`),
checkpoints hold them in PEFT format, and the run's output is the merged model in `RUN/merged/`."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dspost.config import RMRecipe
from dspost.data.loading import BadRows
from dspost.data.packing import batch_indices
from dspost.model.quant import apply_training_precision
from dspost.rundir import RunDir
from dspost.training import Optimizer, check_finite, compile_if_asked, save_checkpoint, torch_dtype


def tokenize_pairs(pairs, tok, max_len: int, bad: BadRows, offset: int = 0) -> list[tuple[list[int], list[int]]]:
    from dspost.rewards.critics import render

    out = []
    for i, p in enumerate(pairs):
        c, r = render(tok, p.prompt, p.chosen), render(tok, p.prompt, p.rejected)
        if max(len(c), len(r)) > max_len:
            bad.add(offset + i, f"longer than data.max_seq_len={max_len} tokens")
            continue
        out.append((c, r))
    return out


def pad(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids


def pair_loss(rm, batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean Bradley-Terry loss and the margins r_chosen - r_rejected of a batch of tokenized pairs."""
    scores = rm(pad([c for c, _ in batch] + [r for _, r in batch], pad_id), pad_id)
    margin = scores[: len(batch)] - scores[len(batch):]
    return -F.logsigmoid(margin).mean(), margin.detach()


@torch.no_grad()
def evaluate(rm, data, pad_id: int, batch_size: int = 32) -> dict[str, float]:
    rm.eval()
    losses, margins = [], []
    for i in range(0, len(data), batch_size):
        loss, margin = pair_loss(rm, data[i: i + batch_size], pad_id)
        losses.append(loss.item() * len(margin))
        margins.append(margin)
    rm.train()
    m = torch.cat(margins)
    return {"eval/loss": sum(losses) / len(m), "eval/accuracy": float((m > 0).float().mean()),
            "eval/margin": float(m.mean())}


def _unwrap(rm):
    """The reward model under PEFT's wrapper (for its config and its router)."""
    return rm.get_base_model() if hasattr(rm, "get_base_model") else rm


def run_rm(recipe: RMRecipe, run: RunDir, model_path: Path, progress=None) -> Path:
    from dspost.data.pairs import load_pairs
    from dspost.model import load_tokenizer
    from dspost.model.reward_model import load_reward_model

    t, d, m = recipe.trainer, recipe.data, recipe.model
    if t.num_workers > 1:
        raise NotImplementedError("trainer.num_workers > 1: multi-worker reward-model training is not implemented yet")
    torch.manual_seed(t.seed)
    tok = load_tokenizer(str(model_path))
    train_pairs, eval_pairs, bad = load_pairs(d)
    train = tokenize_pairs(train_pairs, tok, d.max_seq_len, bad)
    held_out = tokenize_pairs(eval_pairs, tok, d.max_seq_len, bad, offset=len(train_pairs))
    bad.check(d.max_bad_fraction, d.path or "synthetic pairs")
    if not train or not held_out:
        raise ValueError(f"data: {len(train)} training and {len(held_out)} held-out pairs left after dropping bad rows")
    run.log.info("data: %d train, %d held-out pairs; bad rows: %s", len(train), len(held_out), bad.summary())

    dtype = torch_dtype(m)
    resume_from = run.resume_from
    rm = load_reward_model(resume_from if resume_from and not t.lora else model_path, dtype=dtype, init_head_seed=t.seed)
    rm.lm.balance_alpha = m.seq_balance_loss_weight
    apply_training_precision(rm, t.quantization)
    bias_speed = m.bias_update_speed
    if t.lora is not None:
        rm, bias_speed = _adapt(rm, t.lora, model_path, resume_from), 0.0
    compile_if_asked(rm, t)
    rm.train()
    optimizer = Optimizer(rm, t, t.max_steps, router=_unwrap(rm).lm, bias_speed=bias_speed)
    start = optimizer.resume(resume_from).get("step", 0)
    run.resumed(resume_from, start)

    micro = t.batch_size // t.grad_accum
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.precision == "bf16")
    pad_id = _unwrap(rm).args.pad_token_id
    final = None
    for step in range(start, t.max_steps):
        t0 = time.perf_counter()
        idx = batch_indices(len(train), t.batch_size, step, t.seed)
        loss_sum, margins = 0.0, []
        for j in range(t.grad_accum):
            with autocast:
                loss, margin = pair_loss(rm, [train[i] for i in idx[j * micro:(j + 1) * micro]], pad_id)
            check_finite(step + 1, "the pairwise loss", loss)
            (loss / t.grad_accum).backward()
            loss_sum += loss.item() / t.grad_accum
            margins.append(margin)
        lr = optimizer.lr
        grad_norm = optimizer.step(step + 1)
        margin = torch.cat(margins)
        n = step + 1
        metrics = {"train/loss": loss_sum, "train/accuracy": float((margin > 0).float().mean()),
                   "train/margin": float(margin.mean()), "train/grad_norm": float(grad_norm),
                   "train/lr": lr, "time/step": time.perf_counter() - t0}
        if n % t.eval_every == 0 or n == t.max_steps:
            metrics.update(evaluate(rm, held_out, pad_id))
        run.log_metrics(n, metrics)
        if progress is not None:
            progress(n, t.max_steps, metrics)
        if n % t.save_every == 0 or n == t.max_steps:
            final = save_checkpoint(run, rm, tok, optimizer, n)
    final = final or run.latest_checkpoint()
    if t.lora is not None:
        return merge_rm_adapter(final, model_path, run.root / "merged", dtype)
    return final


def _adapt(rm, cfg, base_path: Path, resume_from: Path | None):
    from peft import PeftModel, get_peft_model

    from dspost.lora import lora_config

    if resume_from is not None:
        return PeftModel.from_pretrained(rm, str(resume_from), is_trainable=True)
    config = lora_config(cfg)
    config.modules_to_save = ["score"]  # the head is new: it trains in full beside the adapters
    rm.name_or_path = str(base_path)
    return get_peft_model(rm, config)


def merge_rm_adapter(adapter_dir: Path, base: Path, out: Path, dtype) -> Path:
    from peft import PeftModel

    from dspost.model import load_tokenizer
    from dspost.model.reward_model import load_reward_model

    rm = load_reward_model(base, dtype=dtype, init_head_seed=0)
    merged = PeftModel.from_pretrained(rm, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out, tokenizer=load_tokenizer(str(adapter_dir)))
    return out
