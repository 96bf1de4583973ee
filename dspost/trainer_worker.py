"""The trainer pool: Ray actors holding the policy (and the reference model when kl_beta > 0), one
torch.distributed group (gloo on CPU, nccl on GPU), data-parallel by averaging gradients after backward."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dspost.algorithms import LossInputs, policy_loss
from dspost.config import GRPORecipe, OPDRecipe
from dspost.data.packing import first_fit_decreasing
from dspost.distributed import all_reduce_sum, init_group
from dspost.lora import adapted_tensors, add_adapters, is_adapted, load_adapters
from dspost.training import Optimizer, check_finite, compile_if_asked, device, save_training_checkpoint, torch_dtype


@dataclass
class RolloutBatch:
    """One rank's share of a step: token ids, the engine's logprobs, advantages (GRPO's, or OPD's outcome
    advantages), and for OPD each sample's teacher scores over its response tokens (`dspost.teacher.TeacherScores`)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    rollout_logprobs: list[list[float]]
    advantages: list[float]
    teacher_logprobs: list | None = None  # [R] each: the teacher's logprob of every sampled token
    teacher_index: list[int] | None = None  # the sample's teacher (index into `recipe.teachers`)
    teacher_weight: list[float] | None = None  # w_i of the sample's teacher
    support_ids: list | None = None  # [R, K] each (topk): teacher top-k ++ sampled token; repeats are -1
    support_logprobs: list | None = None  # [R, K] each (topk): the teacher's logprobs at support_ids
    teacher_rows: list | None = None  # [R, V] each (full): the teacher's log-softmax rows


def pack(batch: RolloutBatch, pad_id: int) -> dict[str, torch.Tensor]:
    """[B, L] ids of prompt+response, and [B, L-1] tensors aligned with next-token positions (the teacher's
    [B, L-1, K] support and [B, L-1, V] rows likewise)."""
    seqs = [p + r for p, r in zip(batch.prompt_ids, batch.response_ids)]
    L = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros(B, L - 1)
    out = {"ids": ids, "mask": mask, "rollout_lp": torch.zeros(B, L - 1)}
    per_token = {"rollout_lp": batch.rollout_logprobs, "teacher_lp": batch.teacher_logprobs,
                 "support_ids": batch.support_ids, "support_lp": batch.support_logprobs,
                 "teacher_rows": batch.teacher_rows}
    for key, values in per_token.items():
        if values is not None and key not in out:
            shape = (B, L - 1, *torch.as_tensor(values[0]).shape[1:])
            out[key] = torch.zeros(shape, dtype=torch.long if key == "support_ids" else torch.float32)
    for i, (p, r) in enumerate(zip(batch.prompt_ids, batch.response_ids)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        # response token j sits at position len(p)+j and is predicted from position len(p)+j-1
        span = slice(len(p) - 1, len(p) - 1 + len(r))
        mask[i, span] = 1
        for key, values in per_token.items():
            if values is not None:
                out[key][i, span] = torch.as_tensor(values[i]).to(out[key].dtype)
    if "support_ids" in out:  # a repeated id (-1) becomes a copy of column 0, id and logprob: it counts once
        repeat = out["support_ids"] < 0
        out["support_ids"] = torch.where(repeat, out["support_ids"][..., :1], out["support_ids"])
        out["support_lp"] = torch.where(repeat, out["support_lp"][..., :1], out["support_lp"])
    out["lengths"] = torch.tensor([len(s) for s in seqs])
    out["adv"] = torch.tensor(batch.advantages)
    for key in ("teacher_index", "teacher_weight"):
        if getattr(batch, key) is not None:
            out[key] = torch.tensor(getattr(batch, key))
    return out


class TransformersForward:
    """A transformers causal LM called as our model is (`ids, position_ids=, segment_ids=, logits_at=`): with no
    attention mask, positions restarting at 0 mark the sequences of a packed row
    (`masking_utils.find_packed_sequence_indices`; `check_packing` verifies the model honours them), and
    `logits_to_keep` runs the head at the columns needed only. Our segment ids and routes have no counterpart."""

    def __init__(self, model):
        self.model = model

    def __call__(self, ids, position_ids=None, segment_ids=None, logits_at=None, routes=None):
        from types import SimpleNamespace

        if logits_at is None:
            return SimpleNamespace(logits=self.model(input_ids=ids, position_ids=position_ids, use_cache=False).logits)
        r, c = logits_at
        cols, col_of = torch.unique(c, return_inverse=True)
        out = self.model(input_ids=ids, position_ids=position_ids, logits_to_keep=cols, use_cache=False)
        return SimpleNamespace(logits=out.logits[r, col_of])


def forward_of(model):
    """`model` itself when it is ours (bare or under PEFT adapters), else its `TransformersForward`."""
    from dspost.lora import is_ours

    return model if is_ours(model) else TransformersForward(model)


def check_packing(model, vocab: int, where: str) -> None:
    """A transformers model must keep packed sequences apart (its masks built from restarting positions): three
    short sequences scored in one row must score as each alone, else a one-line error naming `where`."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([8, 8, 9])
    ids = torch.randint(0, vocab, (3, 9), generator=g)
    dev = next(model.parameters()).device
    forward = forward_of(model)
    with torch.no_grad():
        packed = packed_logprobs(forward, ids.to(dev), lengths, 64)[0]  # one row of 25 tokens
        alone = packed_logprobs(forward, ids.to(dev), lengths, 9)[0]  # a row each
    gap = float((packed - alone).abs().max())
    if not gap <= 1e-4:
        raise ValueError(f"{where}: this transformers model lets packed sequences see each other (logprobs move "
                         f"by {gap:.3g} nats when scored together): it needs masks built from position_ids")


def token_logprobs(model, ids: torch.Tensor, routes=None, position_ids=None, segment_ids=None,
                   entropy_grad: bool = False, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position logprob of the next token [B, L-1] under the logits divided by `temperature` (the
    distribution the engine sampled from; 0, greedy, leaves them untempered), and its entropy [B, L-1] (detached unless `entropy_grad`: it costs
    a second [N, vocab] graph)."""
    packed = {"position_ids": position_ids, "segment_ids": segment_ids} if segment_ids is not None else {}
    logits = model(ids, routes=routes, **packed).logits[:, :-1]
    return _next_token_logprobs(logits, ids[:, 1:], entropy_grad, temperature)


def _next_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, entropy_grad: bool,
                         temperature: float, rows: bool = False) -> tuple[torch.Tensor, ...]:
    logits = logits.float()
    if temperature not in (0.0, 1.0):  # 0 is greedy: vLLM reports the untempered logprobs of a greedy sample
        logits = logits / temperature
    logp_all = logits.log_softmax(-1)
    lp = logp_all.gather(-1, targets[..., None])[..., 0]
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return (lp, entropy, logp_all) if rows else (lp, entropy)


def packed_logprobs(model, ids: torch.Tensor, lengths: torch.Tensor, row_len: int, entropy_grad: bool = False,
                    temperature: float = 1.0, at: torch.Tensor | None = None,
                    with_rows: bool = False) -> tuple[torch.Tensor, ...]:
    """`token_logprobs` of the padded sequences `ids` [B, L] (true `lengths` [B]), computed with the
    sequences packed into rows of up to `row_len` tokens: per-sequence attention, positions restarting at
    each sequence. Padding every sequence to the batch's longest wastes the update's time on pad tokens, up to
    a third of it when response lengths spread from a few tokens to max_tokens. Returned in the [B, L-1]
    layout of `pack`. With `at` (bool [B, L-1], e.g. the response mask) the head runs at those positions
    only (the prompt's logprobs are never used) and the others are 0. With `with_rows`, also the log-softmax rows
    [B, L-1, V] there (with their gradient; 0 elsewhere), which OPD's topk and full estimators differentiate."""
    B, L = ids.shape
    n = lengths.tolist()
    rows = first_fit_decreasing(n, row_len)
    used = [sum(n[i] for i in members) for members in rows]
    S = max(used)
    src_seq = torch.zeros(len(rows), S, dtype=torch.long)  # row token (r, t) is ids[src_seq, src_pos]
    src_pos, segments = torch.zeros_like(src_seq), torch.full_like(src_seq, -1)
    where_row, where_col = torch.zeros(B, L - 1, dtype=torch.long), torch.zeros(B, L - 1, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for seg, i in enumerate(members):
            span = slice(start, start + n[i])
            src_seq[r, span], src_pos[r, span], segments[r, span] = i, torch.arange(n[i]), seg
            # sequence i's next-token positions; its padding reads (0, 0), which its mask zeroes
            where_row[i, : n[i] - 1], where_col[i, : n[i] - 1] = r, torch.arange(start, start + n[i] - 1)
            start += n[i]
    if at is None:
        at = torch.arange(L - 1) < lengths[:, None] - 1
    at = at.bool().cpu()
    dev = ids.device
    row_ids = ids[src_seq.to(dev), src_pos.to(dev)]
    r, c = where_row[at].to(dev), where_col[at].to(dev)
    logits = model(row_ids, position_ids=src_pos.to(dev), segment_ids=segments.to(dev), logits_at=(r, c)).logits
    got = _next_token_logprobs(logits, row_ids[r, c + 1], entropy_grad, temperature, with_rows)
    at = at.to(dev)
    lp, entropy = (v.new_zeros(B, L - 1).masked_scatter(at, v) for v in got[:2])
    if not with_rows:
        return lp, entropy
    return lp, entropy, got[2].new_zeros(B, L - 1, got[2].shape[-1]).masked_scatter(at[..., None], got[2])


class TrainerWorker:
    """One rank of the trainer pool, built from the typed recipe: the policy, its optimizer, the reference model
    (when `algorithm.kl_beta > 0`), and its share of every rollout batch."""

    def __init__(self, recipe: GRPORecipe | OPDRecipe, model_path: str, rank: int = 0, world: int = 1, dist_url: str | None = None,
                 resume_from: str | None = None):
        from dspost.lora import is_ours, load_base
        from dspost.model import load_tokenizer
        from dspost.recipe import transformers_policy_problem

        self.recipe, self.rank, self.world = recipe, rank, world
        t, m = recipe.trainer, recipe.model
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        torch.manual_seed(t.seed + rank)
        init_group(rank, world, dist_url)
        self.device = device()
        # Under LoRA the base stays the start checkpoint and a checkpoint holds the adapters (PEFT format).
        # Our model, or any transformers causal LM vLLM serves (the policy needs the engines' architecture only).
        self.model = load_base(model_path if t.lora else (resume_from or model_path), dtype=torch_dtype(m))
        self.ours = is_ours(self.model)
        if not self.ours:  # refused before anything starts for `model.path` (`recipe.check_paths`); here for the rest
            problem = transformers_policy_problem(recipe, type(self.model).__name__)
            if problem:
                raise ValueError(problem)
            check_packing(self.model, self.model.config.vocab_size, f"model {model_path}")
        elif self.device.type == "cuda":  # one-launch Triton grouped GEMM for the routed experts
            from dspost.model.quant import use_grouped_gemm

            use_grouped_gemm(self.model)
        if t.lora is not None:
            self.model = load_adapters(self.model, resume_from) if resume_from else add_adapters(self.model, t.lora,
                                                                                                model_path)
        self.model = self.model.to(self.device).train()
        compile_if_asked(self.model, t)
        self.tokenizer = load_tokenizer(model_path)
        self.ref = (load_base(model_path, dtype=torch_dtype(m)).to(self.device).eval()
                    if recipe.algorithm.kl_beta > 0 else None)
        self.forward, self.ref_forward = forward_of(self.model), forward_of(self.ref) if self.ref is not None else None
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
        self.transport, self.published = None, None  # set by connect_weight_transfer and publish_weights
        # The schedule follows optimizer steps: `algorithm.minibatches` of them per rollout batch.
        # Under LoRA the router biases are part of the frozen base: no bias updates.
        self.optimizer = Optimizer(self.model, t, t.max_steps * recipe.algorithm.minibatches, world,
                                   self.model if self.ours else None,
                                   0.0 if t.lora or not self.ours else m.bias_update_speed)
        self.optimizer.resume(Path(resume_from) if resume_from else None)

    def ready(self) -> int:
        return self.optimizer.steps

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def train_step(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        """One rollout batch's optimizer step(s), `algorithm.minibatches` of them. A non-finite loss, gradient norm
        or weight raises `NonFiniteError` naming the RL `step` before the optimizer applies it (or, for weights,
        before any sync or save can publish them)."""
        t0 = time.perf_counter()
        t, a = self.recipe.trainer, self.recipe.algorithm
        # The policy trained is the one sampled from: the logits at the rollout temperature.
        temperature = self.recipe.rollout.temperature
        x = {k: v.to(self.device) for k, v in pack(batch, self.tokenizer.pad_token_id).items()}

        rows = self.recipe.kind == "opd" and self.recipe.opd.estimator != "sampled"

        def logprobs(forward, idx=slice(None), rows=False):
            with self.autocast:
                return packed_logprobs(forward, x["ids"][idx], x["lengths"][idx], a.pack_len, a.entropy_coef > 0,
                                       temperature, at=x["mask"][idx], with_rows=rows)

        # With one optimizer step per batch, every forward sees the weights that produced the batch: the
        # training forward's own logprobs (detached) are the old ones, and no separate pass is needed.
        old_lp = entropy = None
        with torch.no_grad():
            if a.minibatches > 1:
                self.model.eval()
                old_lp, entropy = logprobs(self.forward)
                self.model.train()
            ref_lp = logprobs(self.ref_forward)[0] if self.ref is not None else None
        B = x["ids"].shape[0]
        seen_lp, seen_entropy = torch.zeros_like(x["rollout_lp"]), torch.zeros_like(x["rollout_lp"])
        seen_kl = torch.zeros_like(x["rollout_lp"])
        sums: dict[str, float] = {}
        for mb in torch.arange(B).chunk(a.minibatches):
            # Every mean is over the whole minibatch, on every rank (see dspost/algorithms.py).
            tokens, sequences = all_reduce_sum([float(x["mask"][mb].sum()), float(len(mb))], self.world)
            for micro in mb.chunk(t.grad_accum):
                lp, ent, *student_rows = logprobs(self.forward, micro, rows)
                old = old_lp[micro] if old_lp is not None else lp.detach()
                if old_lp is None:
                    seen_lp[micro], seen_entropy[micro] = old, ent.detach()
                if self.recipe.kind == "opd":
                    loss, seen_kl[micro], m = self._distill_loss(x, micro, lp, old, student_rows, tokens)
                else:
                    inputs = LossInputs(lp, old, x["rollout_lp"][micro], x["adv"][micro], x["mask"][micro],
                                        ref_lp[micro] if ref_lp is not None else None, ent, tokens=tokens,
                                        sequences=sequences, max_len=self.recipe.rollout.max_tokens)
                    loss, m = policy_loss(inputs, a)
                check_finite(step, "the policy loss", loss)
                # The group averages gradients over its ranks; each rank's loss is its share of the global mean.
                (loss * self.world).backward()
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * self.world / a.minibatches
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v * len(micro) / B
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + self.optimizer.step(step) / a.minibatches
        if old_lp is None:
            old_lp, entropy = seen_lp, seen_entropy
        n = x["mask"].sum()
        metrics: dict[str, float] = {
            "train/entropy": float((entropy * x["mask"]).sum() / n),
            "train/rollout_logprob_diff": float(((old_lp - x["rollout_lp"]).abs() * x["mask"]).sum() / n)}
        if self.recipe.kind == "opd":
            from dspost.algorithms import opd_metrics
            from dspost.teacher import teacher_names

            metrics.update(opd_metrics(seen_kl, x["mask"], x["teacher_index"], teacher_names(self.recipe.teachers)))
        load = self.model.expert_load() if self.ours else torch.zeros(0)
        if load.numel():
            ratios = load.max(1).values / load.min(1).values.clamp(min=1)
            metrics["moe/load_max_min_ratio"] = float(ratios.max())
            metrics.update({f"moe/layer{i}/load_max_min_ratio": float(v) for i, v in enumerate(ratios)})
        metrics.update({f"train/{k}": v for k, v in sums.items()})
        metrics["train/tokens"] = float(n)
        metrics["train/seconds"] = time.perf_counter() - t0
        return metrics

    def _distill_loss(self, x: dict[str, torch.Tensor], micro: torch.Tensor, lp: torch.Tensor, old: torch.Tensor,
                      student_rows: list[torch.Tensor], tokens: float):
        """OPD's loss on one micro-batch (`algorithms.distill_loss`): the estimator of `opd.estimator` against each
        sample's own teacher, plus the outcome advantage when a reward term has a weight."""
        from dspost.algorithms import DistillInputs, distill_loss

        o = self.recipe.opd
        get = lambda key: x[key][micro] if key in x else None  # noqa: E731
        inputs = DistillInputs(lp, old, x["rollout_lp"][micro], x["teacher_lp"][micro], x["mask"][micro],
                               x["teacher_weight"][micro], student_rows[0] if student_rows else None,
                               get("support_ids"), get("support_lp"), get("teacher_rows"),
                               x["adv"][micro] if self.recipe.outcome_reward else None, tokens=tokens)
        return distill_loss(inputs, o.estimator, self.recipe.algorithm, o.discount)

    def connect_weight_transfer(self, workers: list) -> None:
        """The recipe's weight transport (`rollout/sync.py`) to the rollout workers, once, before the first sync."""
        from dspost.rollout.sync import TRANSPORTS

        cfg = self.recipe.sync
        self.transport = TRANSPORTS[cfg.transport](int(cfg.bucket_mb * 2**20))
        # A push of the model's own tensors can read them in place; merged adapters and quantised copies are new.
        plain = not is_adapted(self.model) and cfg.quantize == "none"
        self.transport.connect(workers, host=self.model if plain else None)

    def rejoin_weight_transfer(self, index: int, worker) -> None:
        """A restarted rollout worker to the last pushed weights (the pool calls this, between a push and the next
        update: the transport may hand out the trainer's weights in place)."""
        from dspost.rollout.sync import SyncError

        if self.published is not None and self.published != self.optimizer.steps:  # None: engines serve the start
            raise SyncError(f"rollout worker {index} restarted after an optimizer step and before the next sync: the "
                            "weights it would load are not the version the pool serves")
        self.transport.rejoin(index, worker)

    def _checkpoint_tensors(self):
        """What a sync sends: every tensor vLLM serves, or under LoRA the merged adapted ones only (`adapted_tensors`:
        the engines serve the frozen base, so those are all that differ)."""
        from dspost.model import hf_tensors
        from dspost.model.checkpoint import quantize_named

        if is_adapted(self.model):
            return adapted_tensors(self.model)
        if not self.ours:  # a transformers model's own names are the checkpoint's
            return list(self.model.state_dict().items())
        named = hf_tensors(self.model, include_mtp=False)  # vLLM serves no MTP layers here
        quantize = self.recipe.sync.quantize
        return quantize_named(named, quantize) if quantize != "none" else named

    def publish_weights(self, version: int) -> dict[str, float]:
        """The current weights (HF names) into every engine, which then serves `version`."""
        stats = self.transport.push(self._checkpoint_tensors(), version)
        self.published = self.optimizer.steps
        return {"sync/bytes": float(stats.bytes), "sync/push_seconds": stats.seconds,
                "sync/load_seconds": stats.load_seconds, "sync/staged_bytes": float(stats.staged_bytes)}

    @torch.no_grad()
    def sequence_logprobs(self, seqs: list[list[int]]) -> list[list[float]]:
        self.model.eval()
        out = []
        for s in seqs:
            lp, _ = token_logprobs(self.forward, torch.tensor([s], device=self.device))
            out.append(lp[0].tolist())
        self.model.train()
        return out

    def save(self, path: str, step: int) -> str:
        if self.rank == 0:
            save_training_checkpoint(Path(path), self.model, self.tokenizer, self.optimizer, step,
                                     {"opt_steps": self.optimizer.steps})
        return path

