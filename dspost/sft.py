"""Supervised fine-tuning of our DeepSeek MoE: loss on assistant tokens only, AdamW with warm-up + cosine,
gradient accumulation and clipping, aux-loss-free bias updates and the MTP loss, held-out loss (and, for
math data, greedy accuracy) every `eval_every` steps, atomic checkpoints and exact resume.

The data order is a pure function of (seed, step), and the RNG state is checkpointed, so a resumed CPU
run repeats the uninterrupted one exactly."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel

from dspost.data.loading import BadRows, Example
from dspost.lora import add_adapters, load_adapters, merge_lora, merged
from dspost.model.quant import apply_training_precision
from dspost.rundir import RunDir
from dspost.training import optimizer_and_start, save_training_checkpoint, set_lr


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def tokenize(examples: list[Example], tok, max_len: int, bad: BadRows, offset: int = 0) -> list[Tokenized]:
    out = []
    for i, ex in enumerate(examples):
        enc = tok.apply_chat_template(ex.messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
        if not any(mask):  # a template without {% generation %} marks: train on the last turn
            prefix = tok.apply_chat_template(ex.messages[:-1], tokenize=True, add_generation_prompt=True)
            prefix = prefix["input_ids"] if isinstance(prefix, dict) or hasattr(prefix, "keys") else prefix
            mask = [0] * len(prefix) + [1] * (len(ids) - len(prefix))
        if len(ids) > max_len:
            bad.add(offset + i, f"longer than data.max_seq_len={max_len} tokens")
            continue
        out.append(Tokenized(ids, [t if m else -100 for t, m in zip(ids, mask)]))
    return out


def collate(batch: list[Tokenized], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Right padding under a causal mask never reaches real tokens, so no attention mask is needed.
    S = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), S), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), S), -100, dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[i, : len(s.labels)] = torch.tensor(s.labels)
    # Next-token targets: position t predicts t+1.
    return ids, torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)


@dataclass
class Packed:
    """Several tokenized samples in one row: `segments[i]` numbers the sample each token belongs to."""
    input_ids: list[int]
    labels: list[int]
    segments: list[int]


def pack(samples: list[Tokenized], max_len: int) -> list[Packed]:
    """Next-fit in data order: rows of at most `max_len` tokens. A sample's last label is dropped
    (its next token is another sample's first)."""
    rows: list[Packed] = []
    for s in samples:
        row = rows[-1] if rows and len(rows[-1].input_ids) + len(s.input_ids) <= max_len else None
        if row is None:
            row = Packed([], [], [])
            rows.append(row)
        seg = row.segments[-1] + 1 if row.segments else 0
        row.input_ids += s.input_ids
        row.labels += s.labels
        row.segments += [seg] * len(s.input_ids)
    return rows


def collate_packed(batch: list[Packed], pad_id: int):
    """ids, next-token labels, segment ids (padding is segment -1) and positions restarting per sample."""
    S = max(len(r.input_ids) for r in batch)
    ids = torch.full((len(batch), S), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), S), -100, dtype=torch.long)
    segments = torch.full((len(batch), S), -1, dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r.input_ids)
        ids[i, :n], labels[i, :n], segments[i, :n] = (torch.tensor(r.input_ids), torch.tensor(r.labels),
                                                     torch.tensor(r.segments))
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    index = torch.arange(S).expand(len(batch), S)
    positions = index - torch.cummax(torch.where(starts, index, 0), dim=1).values
    next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    same = torch.nn.functional.pad(segments[:, 1:] == segments[:, :-1], (0, 1), value=False)
    return ids, next_labels.masked_fill(~same, -100), segments, positions


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of step `step` (0-based) in an epoch-wise shuffled stream; a pure function of its inputs."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        take = min(batch_size - len(out), n - offset)
        out += perm[offset: offset + take]
        pos += take
    return out


@torch.no_grad()
def eval_loss(model, data: list[Tokenized], pad_id: int, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        ids, labels = collate(data[i: i + batch_size], pad_id)
        logits = model(ids).logits
        n = int((labels != -100).sum())
        total += float(torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"))
        count += n
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def eval_accuracy(model, examples: list[Example], tok, max_new_tokens: int = 48, batch_size: int = 32) -> float:
    """Greedy-decode the held-out prompts and grade the final answers with the math verifier."""
    from dspost.rewards import verify_math

    model.eval()
    scored = [ex for ex in examples if ex.answer is not None]
    correct = 0
    for i in range(0, len(scored), batch_size):
        chunk = scored[i: i + batch_size]
        prompts = [list(tok.apply_chat_template(ex.messages[:-1], tokenize=True, add_generation_prompt=True,
                                                return_dict=True)["input_ids"]) for ex in chunk]
        with merged(model) as plain:
            outs = plain.generate(prompts, max_new_tokens, eos_token_id=tok.eos_token_id)
        for ex, out in zip(chunk, outs):
            correct += verify_math(tok.decode(out, skip_special_tokens=True), ex.answer).score == 1.0
    model.train()
    return correct / max(len(scored), 1)


def run_sft(recipe: BaseModel, run: RunDir, model_path: Path, progress=None) -> Path:
    from dspost.data.loading import load_examples
    from dspost.model import from_pretrained, load_tokenizer

    t, d, m = recipe.trainer, recipe.data, recipe.model
    if t.num_workers > 1:
        raise NotImplementedError("trainer.num_workers > 1: multi-worker SFT on Ray is not implemented yet")
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    tok = load_tokenizer(str(model_path))
    train_ex, eval_ex, bad = load_examples(d)
    train = tokenize(train_ex, tok, d.max_seq_len, bad)
    packed = pack(train, d.max_seq_len) if d.pack else None
    held_out = tokenize(eval_ex, tok, d.max_seq_len, bad, offset=len(train_ex))
    bad.check(d.max_bad_fraction, d.path or "synthetic data")
    run.log.info("data: %d train, %d held-out samples; bad rows: %s", len(train), len(held_out), bad.summary())

    dtype = torch.bfloat16 if m.dtype == "bfloat16" else torch.float32
    resume_from = run.latest_checkpoint() if recipe.resume else None
    model = from_pretrained(model_path if t.lora else (resume_from or model_path), dtype=dtype)
    model.mtp_loss_weight, model.balance_alpha = m.mtp_loss_weight, m.seq_balance_loss_weight
    apply_training_precision(model, t.quantization)
    bias_speed = m.bias_update_speed
    if t.lora is not None:
        model = load_adapters(model, resume_from) if resume_from else add_adapters(model, t.lora, model_path)
        bias_speed = 0.0  # the base model, router biases included, stays frozen: only adapters are saved
        run.log.info("LoRA: %d trainable of %d parameters; router bias updates off",
                     sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))
    model.train()
    opt, start_step = optimizer_and_start(model, t, run, resume_from)
    params = [p for group in opt.param_groups for p in group["params"]]

    micro = t.batch_size // t.grad_accum
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.precision == "bf16")
    final = None
    for step in range(start_step, t.max_steps):
        t0 = time.perf_counter()
        set_lr(opt, t, step)
        idx = batch_indices(len(packed or train), t.batch_size, step, t.seed)
        sums = {"loss": 0.0, "lm": 0.0, "mtp": 0.0}
        tokens = 0
        for j in range(t.grad_accum):
            chunk = idx[j * micro:(j + 1) * micro]
            if packed is not None:
                ids, labels, segments, positions = collate_packed([packed[i] for i in chunk], tok.pad_token_id)
                inputs = {"segment_ids": segments, "position_ids": positions}
            else:
                (ids, labels), inputs = collate([train[i] for i in chunk], tok.pad_token_id), {}
            with autocast:
                out = model(ids, labels=labels, **inputs)
            (out.loss / t.grad_accum).backward()
            sums["loss"] += out.loss.item() / t.grad_accum
            sums["lm"] += out.lm_loss.item() / t.grad_accum
            sums["mtp"] += sum(x.item() for x in out.mtp_losses) / t.grad_accum
            tokens += ids.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.clip_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_biases(bias_speed)
        load = model.expert_load()
        n = step + 1
        metrics = {
            "train/loss": sums["loss"], "train/lm_loss": sums["lm"], "train/mtp_loss": sums["mtp"],
            "train/grad_norm": float(grad_norm), "train/lr": opt.param_groups[0]["lr"],
            "perf/tokens_per_s": tokens / (time.perf_counter() - t0), "time/step": time.perf_counter() - t0,
        }
        if load.numel():
            metrics["moe/load_max_min_ratio"] = float((load.max(1).values / load.min(1).values.clamp(min=1)).max())
        if n % t.eval_every == 0 or n == t.max_steps:
            metrics["eval/loss"] = eval_loss(model, held_out, tok.pad_token_id, 32)
            if any(ex.answer for ex in eval_ex):
                metrics["eval/accuracy"] = eval_accuracy(model, eval_ex[:100], tok)
        run.log_metrics(n, metrics)
        if progress is not None:
            progress(n, t.max_steps, metrics)
        if n % t.save_every == 0 or n == t.max_steps:
            final = save_checkpoint(run, model, tok, opt, n)
    final = final or run.latest_checkpoint()
    if t.lora is not None:  # later stages (and vLLM) need a full checkpoint
        merged_dir = merge_lora(final, run.root / "merged", base=model_path)
        run.log.info("merged the LoRA adapter of %s into %s", final, merged_dir)
        return merged_dir
    return final


def save_checkpoint(run: RunDir, model, tok, opt, step: int) -> Path:
    path = save_training_checkpoint(run.checkpoint_path(step), model, tok, opt, step)
    run.mark_latest(step)
    run.log.info("saved %s", path)
    return path
