"""Supervised fine-tuning of our DeepSeek MoE or any transformers causal LM, full or LoRA: loss on assistant
tokens only, AdamW with warm-up + cosine, gradient accumulation and clipping, aux-loss-free bias updates and
the MTP loss (our MoE), held-out loss (and, for math data, greedy accuracy) every `eval_every` steps, atomic
checkpoints and exact resume; one worker in-process, or several as Ray actors in one torch.distributed group.

The data order is a pure function of (seed, step), and the RNG state is checkpointed, so a resumed CPU
run repeats the uninterrupted one exactly."""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from dspost.config import SFTRecipe
from dspost.data.loading import BadRows, Example
from dspost.data.packing import Tokenized, collate, collate_packed, one_row, pack
from dspost.data.sources import load_mixture, source_label
from dspost.distributed import all_reduce_mean, group_url, init_group, shutdown_group, start_ray
from dspost.lora import add_adapters, is_ours, load_adapters, merge_lora, merged
from dspost.model.quant import apply_training_precision
from dspost.rundir import RunDir
from dspost.training import Optimizer, check_finite, compile_if_asked, device, save_training_checkpoint, torch_dtype


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
            bad.add(ex.row if ex.row is not None else offset + i, f"longer than data.max_seq_len={max_len} tokens")
            continue
        out.append(Tokenized(ids, [t if m else -100 for t, m in zip(ids, mask)]))
    return out


@torch.no_grad()
def eval_loss(model, data: list[Tokenized], pad_id: int, batch_size: int) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        ids, labels = (x.to(device) for x in collate(data[i: i + batch_size], pad_id))
        logits = model(ids).logits
        n = int((labels != -100).sum())
        total += float(torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"))
        count += n
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def greedy(model, prompts: list[list[int]], max_new_tokens: int, tok) -> list[list[int]]:
    """Greedy continuations of `prompts` (new tokens only) from our model or a transformers causal LM."""
    if is_ours(model):
        return model.generate(prompts, max_new_tokens, eos_token_id=tok.eos_token_id)
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), tok.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, so every continuation starts at column L
        ids[i, L - len(p):], attention[i, L - len(p):] = torch.tensor(p), 1
    device = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return [row[L:].tolist() for row in out]


VERIFIERS = {"instruct": lambda ex: "instruction_id_list" in ex.extra, "math": lambda ex: ex.answer is not None}
"""The reward that grades a held-out example's answer in SFT evaluation, by what the example carries."""


def verifier_of(ex: Example) -> str | None:
    return next((name for name, applies in VERIFIERS.items() if applies(ex)), None)


@torch.no_grad()
def eval_accuracy(model, examples: list[Example], tok, scorer, max_new_tokens: int = 48, batch_size: int = 32,
                  timeout: float = 5.0) -> dict[str | None, float]:
    """Greedy-decode the held-out prompts and grade them with each example's verifier (`VERIFIERS`: the
    instruction checker for instruction-following rows, the math verifier for rows with an answer), in the scoring
    pool's worker processes (`scorer`): model output is never parsed inside the trainer. Accuracy per domain."""
    from dspost.rewards import resolve

    model.eval()
    scored = [ex for ex in examples if verifier_of(ex) is not None]
    texts = []
    for i in range(0, len(scored), batch_size):
        chunk = scored[i: i + batch_size]
        prompts = [list(tok.apply_chat_template(ex.messages[:-1], tokenize=True, add_generation_prompt=True,
                                                return_dict=True)["input_ids"]) for ex in chunk]
        with merged(model) as plain:
            outs = greedy(plain, prompts, max_new_tokens, tok)
        texts += [tok.decode(out, skip_special_tokens=True) for out in outs]
    model.train()
    correct: dict[str | None, list[bool]] = {}
    for name in VERIFIERS:
        mine = [i for i, ex in enumerate(scored) if verifier_of(ex) == name]
        verdicts = scorer.map(resolve(name), [(texts[i], {"answer": scored[i].answer, **scored[i].extra}) for i in mine],
                              timeout) if mine else []
        for i, v in zip(mine, verdicts):
            correct.setdefault(scored[i].domain, []).append(v.status == "correct")
    return {d: sum(c) / len(c) for d, c in correct.items()}


def lm_loss(model, ids, labels, segments=None, positions=None):
    """(loss to minimise, next-token loss, MTP losses). Labels are already next-token aligned."""
    if is_ours(model):
        packed = {"segment_ids": segments, "position_ids": positions} if segments is not None else {}
        out = model(ids, labels=labels, return_logits=False, **packed)
        return out.loss, out.lm_loss, out.mtp_losses
    # transformers reads packed rows from position ids that restart per sample (no attention mask given)
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    return loss, loss, []


class SFTWorker:
    """One rank of SFT: a model replica, its optimizer and the tokenized data, of which it takes its share of
    every batch. One worker runs in the driver's process; several run as Ray actors in one torch.distributed
    group, gradients and router load summed over it, so they train exactly like one worker accumulating
    their micro-batches."""

    def __init__(self, recipe: SFTRecipe, model_path: str, rank: int = 0, world: int = 1, dist_url: str | None = None,
                 resume_from: str | None = None):
        self.args, self.recipe = (recipe, model_path, dist_url, resume_from), recipe
        self.t, self.rank, self.world = recipe.trainer, rank, world
        self.scorer = None  # the scoring pool grading held-out answers (rank 0 evaluates)

    def setup(self) -> dict:
        """Load data and model (separate from `__init__` so that a Ray actor's bad-input error reaches the
        driver as itself, not as a dead actor)."""
        from dspost.lora import load_base
        from dspost.model import load_tokenizer

        recipe, model_path, dist_url, resume_from = self.args
        t, d, m, rank, world = recipe.trainer, recipe.data, recipe.model, self.rank, self.world
        if world > 1 and t.num_threads:
            torch.set_num_threads(t.num_threads)
        init_group(rank, world, dist_url)
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        self.tok = tok = load_tokenizer(model_path)
        train, held_out, bad = load_mixture(d)
        n_train = {dom: len(part) for dom, part in train.parts.items()}
        self.train = train.map(lambda dom, part: tokenize(part, tok, d.max_seq_len, bad[dom]))
        # Packed rows hold one source's samples each, so a batch keeps the sources' mixing weights.
        self.batches = self.train.map(lambda dom, part: pack(part, d.max_seq_len)) if d.pack else self.train
        self.items = self.batches.items
        self.eval_ex = held_out.items
        self.held_out = [x for dom, part in held_out.parts.items()
                         for x in tokenize(part, tok, d.max_seq_len, bad[dom], offset=n_train[dom])]
        self.notes = []
        for dom, b in bad.items():
            b.check(d.max_bad_fraction, source_label(d, dom))
            self.notes.append(f"data {dom or ''}: {len(self.train.parts[dom])} train, "
                              f"{len(held_out.parts[dom])} held-out samples; bad rows: {b.summary()}")

        model = load_base(model_path if t.lora else (resume_from or model_path), dtype=torch_dtype(m))
        self.ours = is_ours(model)
        # Our model attends per sample within a row, so a micro-batch runs as one row without pad tokens; the
        # sequence-wise balance loss would see that row as one sequence.
        self.padding_free = self.ours and m.seq_balance_loss_weight == 0
        self.bias_speed = m.bias_update_speed if self.ours else 0.0
        if self.ours:
            model.mtp_loss_weight, model.balance_alpha = m.mtp_loss_weight, m.seq_balance_loss_weight
            apply_training_precision(model, t.quantization)
        elif t.quantization != "none":
            raise ValueError(f"trainer.quantization={t.quantization}: low-precision training is implemented for "
                             f"deepseek_v3 checkpoints; {model_path} holds a {type(model).__name__}")
        if t.lora is not None:
            model = load_adapters(model, resume_from) if resume_from else add_adapters(model, t.lora, model_path)
            self.bias_speed = 0.0  # the base model, router biases included, stays frozen: only adapters are saved
            self.notes.append(f"LoRA: {sum(p.numel() for p in model.parameters() if p.requires_grad)} trainable of "
                              f"{sum(p.numel() for p in model.parameters())} parameters; router bias updates off")
        compile_if_asked(model, t)
        self.device = device()
        self.model = model.to(self.device).train()
        self.optimizer = Optimizer(model, t, t.max_steps, world, model if self.ours else None, self.bias_speed)
        self.start_step = self.optimizer.resume(Path(resume_from) if resume_from else None).get("step", 0)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
        return {"start_step": self.start_step, "notes": self.notes}

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        t = self.t
        idx = self.batches.batch(t.batch_size, step, t.seed)
        share = t.batch_size // self.world
        idx = idx[self.rank * share:(self.rank + 1) * share]
        micro = share // t.grad_accum
        sums = {"loss": 0.0, "lm": 0.0, "mtp": 0.0, "tokens": 0.0, "real_tokens": 0.0}
        for j in range(t.grad_accum):
            chunk = idx[j * micro:(j + 1) * micro]
            items = [self.items[i] for i in chunk]
            if self.padding_free:
                ids, labels, segments, positions = collate_packed([one_row(items)], self.tok.pad_token_id)
            elif self.recipe.data.pack:
                ids, labels, segments, positions = collate_packed(items, self.tok.pad_token_id)
            else:
                (ids, labels), segments, positions = collate(items, self.tok.pad_token_id), None, None
            ids, labels, segments, positions = (x.to(self.device) if x is not None else None
                                                for x in (ids, labels, segments, positions))
            with self.autocast:
                loss, lm, mtp = lm_loss(self.model, ids, labels, segments, positions)
            check_finite(step + 1, "the training loss", loss)
            (loss / t.grad_accum).backward()
            sums["loss"] += loss.item() / t.grad_accum
            sums["lm"] += lm.item() / t.grad_accum
            sums["mtp"] += sum(x.item() for x in mtp) / t.grad_accum
            sums["tokens"] += ids.numel()
            sums["real_tokens"] += float((segments >= 0).sum()) if segments is not None else sum(
                len(item.input_ids) for item in items)
        lr = self.optimizer.lr
        grad_norm = self.optimizer.step(step + 1)
        sums = all_reduce_mean(sums, self.world)
        seconds = time.perf_counter() - t0
        metrics = {
            "train/loss": sums["loss"], "train/lm_loss": sums["lm"], "train/grad_norm": float(grad_norm),
            "train/lr": lr, "train/tokens": sums["real_tokens"] * self.world,
            "perf/tokens_per_s": sums["tokens"] * self.world / seconds,
            "time/step": seconds,
        }
        if self.ours:
            metrics["train/mtp_loss"] = sums["mtp"]
            load = self.model.expert_load()
            if load.numel():
                metrics["moe/load_max_min_ratio"] = float((load.max(1).values / load.min(1).values.clamp(min=1)).max())
        return metrics

    def evaluate(self) -> dict[str, float]:
        metrics = {"eval/loss": eval_loss(self.model, self.held_out, self.tok.pad_token_id, 32)}
        graded = [ex for ex in self.eval_ex if verifier_of(ex) is not None]
        if graded:
            if self.scorer is None:  # started on first use: runs without verifiable answers need no workers
                from dspost.rewards import ScoringPool

                self.scorer = ScoringPool(1)
            per_domain = {}  # at most 100 held-out examples per domain, as before per run
            for ex in graded:
                per_domain.setdefault(ex.domain, [])
                if len(per_domain[ex.domain]) < 100:
                    per_domain[ex.domain].append(ex)
            accuracy = eval_accuracy(self.model, [ex for part in per_domain.values() for ex in part], self.tok, self.scorer)
            for dom, acc in accuracy.items():
                metrics["eval/accuracy" if dom is None else f"eval/{dom}/accuracy"] = acc
            if None not in accuracy:
                metrics["eval/accuracy"] = sum(accuracy.values()) / len(accuracy)
        return metrics

    def save(self, path: str, step: int) -> str:
        save_training_checkpoint(Path(path), self.model, self.tok, self.optimizer, step)
        return path

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
        shutdown_group(self.world)


class Workers:
    """The SFT workers: one in this process (no Ray), or `trainer.num_workers` Ray actors."""

    def __init__(self, recipe: SFTRecipe, model_path: Path, resume_from: Path | None):
        t = recipe.trainer
        resume = str(resume_from) if resume_from else None
        self.ray = None
        if t.num_workers == 1:
            self.workers = [SFTWorker(recipe, str(model_path), resume_from=resume)]
            return
        self.ray, self.own_ray = start_ray(recipe.ray)
        env = {"OMP_NUM_THREADS": str(t.num_threads)} if t.num_threads else {}
        actor = self.ray.remote(SFTWorker).options(num_cpus=t.num_cpus_per_worker, num_gpus=t.num_gpus_per_worker,
                                                   resources=t.resources or None, runtime_env={"env_vars": env})
        url = group_url()
        self.workers = [actor.remote(recipe, str(model_path), rank, t.num_workers, url, resume)
                        for rank in range(t.num_workers)]

    def all(self, method: str, *args) -> list:
        if self.ray is None:
            return [getattr(w, method)(*args) for w in self.workers]
        return self._get([getattr(w, method).remote(*args) for w in self.workers])

    def first(self, method: str, *args):
        if self.ray is None:
            return getattr(self.workers[0], method)(*args)
        return self._get(getattr(self.workers[0], method).remote(*args))

    def _get(self, refs):
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as e:  # the worker's own exception (bad input stays one line)
            raise e.cause from e

    def close(self) -> None:
        if self.ray is not None:
            self.all("close")
            for w in self.workers:
                self.ray.kill(w)
            if self.own_ray:
                self.ray.shutdown()


def run_sft(recipe: SFTRecipe, run: RunDir, model_path: Path, progress=None) -> Path:
    t = recipe.trainer
    resume_from = run.resume_from
    workers = Workers(recipe, model_path, resume_from)
    try:
        info = workers.all("setup")[0]
        for note in info["notes"]:
            run.log.info("%s", note)
        run.resumed(resume_from, info["start_step"])
        final = None
        for step in range(info["start_step"], t.max_steps):
            metrics = workers.all("train_step", step)[0]  # every rank returns the group's averages
            n = step + 1
            if n % t.eval_every == 0 or n == t.max_steps:
                metrics.update(workers.first("evaluate"))
            run.log_metrics(n, metrics)
            if progress is not None:
                progress(n, t.max_steps, metrics)
            if n % t.save_every == 0 or n == t.max_steps:
                final = Path(workers.first("save", str(run.checkpoint_path(n)), n))
                run.mark_latest(n)
                run.log.info("saved %s", final)
    finally:
        workers.close()
    final = final or run.latest_checkpoint()
    if t.lora is not None:  # later stages (and vLLM) need a full checkpoint
        merged_dir = merge_lora(final, run.root / "merged", base=model_path)
        run.log.info("merged the LoRA adapter of %s into %s", final, merged_dir)
        return merged_dir
    return final
