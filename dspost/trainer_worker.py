"""The trainer pool: Ray actors holding the policy (and the reference model when kl_beta > 0), one
torch.distributed group (gloo on CPU, nccl on GPU), data-parallel by averaging gradients after backward."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dspost.algorithms import LossInputs, policy_loss
from dspost.distributed import all_reduce_grads, all_reduce_router_load, free_port, init_group
from dspost.training import (check_finite, compile_if_asked, floating_tensors, load_training_state, lr_factor,
                             save_training_checkpoint)


@dataclass
class RolloutBatch:
    """One rank's share of a step: token ids, the engine's logprobs, advantages."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    rollout_logprobs: list[list[float]]
    advantages: list[float]
    routes: list | None = None


def pack(batch: RolloutBatch, pad_id: int) -> dict[str, torch.Tensor]:
    """[B, L] ids of prompt+response, and [B, L-1] tensors aligned with next-token positions."""
    seqs = [p + r for p, r in zip(batch.prompt_ids, batch.response_ids)]
    L = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros(B, L - 1)
    rollout_lp = torch.zeros(B, L - 1)
    for i, (p, r, lp) in enumerate(zip(batch.prompt_ids, batch.response_ids, batch.rollout_logprobs)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        # response token j sits at position len(p)+j and is predicted from position len(p)+j-1
        mask[i, len(p) - 1: len(p) - 1 + len(r)] = 1
        rollout_lp[i, len(p) - 1: len(p) - 1 + len(r)] = torch.tensor(lp, dtype=torch.float32)
    lengths = torch.tensor([len(s) for s in seqs])
    return {"ids": ids, "lengths": lengths, "mask": mask, "rollout_lp": rollout_lp, "adv": torch.tensor(batch.advantages)}


def token_logprobs(model, ids: torch.Tensor, routes=None, position_ids=None, segment_ids=None,
                   entropy_grad: bool = False, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position logprob of the next token [B, L-1] under the logits divided by `temperature` (the
    distribution the engine sampled from), and its entropy [B, L-1] (detached unless `entropy_grad`: it costs
    a second [N, vocab] graph)."""
    packed = {"position_ids": position_ids, "segment_ids": segment_ids} if segment_ids is not None else {}
    logits = model(ids, routes=routes, **packed).logits[:, :-1]
    return _next_token_logprobs(logits, ids[:, 1:], entropy_grad, temperature)


def _next_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, entropy_grad: bool,
                         temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = logits.log_softmax(-1)
    lp = logp_all.gather(-1, targets[..., None])[..., 0]
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return lp, entropy


def packed_logprobs(model, ids: torch.Tensor, lengths: torch.Tensor, row_len: int, entropy_grad: bool = False,
                    temperature: float = 1.0, at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` of the padded sequences `ids` [B, L] (true `lengths` [B]), computed with the
    sequences packed into rows of up to `row_len` tokens: per-sequence attention, positions restarting at
    each sequence. Padding every sequence to the batch's longest wastes the update's time on pad tokens, up to
    a third of it when response lengths spread from a few tokens to max_tokens. Returned in the [B, L-1]
    layout of `pack`. With `at` (bool [B, L-1], e.g. the response mask) the head runs at those positions
    only (the prompt's logprobs are never used) and the others are 0."""
    B, L = ids.shape
    n = lengths.tolist()
    rows: list[list[int]] = []  # sequence indices per row, first-fit decreasing
    used: list[int] = []
    for i in sorted(range(B), key=lambda i: -n[i]):
        r = next((r for r, u in enumerate(used) if u + n[i] <= row_len), len(rows))
        if r == len(rows):
            rows.append([])
            used.append(0)
        rows[r].append(i)
        used[r] += n[i]
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
    lp, entropy = _next_token_logprobs(logits, row_ids[r, c + 1], entropy_grad, temperature)
    at = at.to(dev)
    return lp.new_zeros(B, L - 1).masked_scatter(at, lp), entropy.new_zeros(B, L - 1).masked_scatter(at, entropy)


class TrainerWorker:
    def __init__(self, model_path: str, cfg: dict, rank: int = 0, world: int = 1, dist_url: str | None = None,
                 resume_from: str | None = None):
        from types import SimpleNamespace

        from dspost.model import from_pretrained, load_tokenizer

        self.trainer = SimpleNamespace(**cfg["trainer"])
        self.algo = SimpleNamespace(**cfg["algorithm"])
        self.model_cfg = SimpleNamespace(**cfg["model"])
        self.cfg_quantize = cfg.get("quantize", "none")  # weight format sent to the engines (quantise-on-sync)
        # The policy trained is the one sampled from: the model's distribution at the rollout temperature
        # (greedy rollouts, temperature 0, come with the engine's untempered logprobs).
        self.temperature = cfg.get("temperature") or 1.0
        if self.trainer.num_threads:
            torch.set_num_threads(self.trainer.num_threads)
        torch.manual_seed(self.trainer.seed + rank)
        self.rank, self.world = rank, world
        init_group(rank, world, dist_url)
        dtype = torch.bfloat16 if self.model_cfg.dtype == "bfloat16" else torch.float32
        # Ray exposes a GPU to this actor only when it asked for one (trainer.num_gpus_per_worker).
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.model = from_pretrained(resume_from or model_path, dtype=dtype).to(self.device).train()
        if self.device.type == "cuda":  # one-launch Triton grouped GEMM for the routed experts
            from dspost.model.quant import use_grouped_gemm

            use_grouped_gemm(self.model)
        compile_if_asked(self.model, self.trainer)
        self.tokenizer = load_tokenizer(model_path)
        self.ref = from_pretrained(model_path, dtype=dtype).to(self.device).eval() if self.algo.kl_beta > 0 else None
        self.transport = None  # set by connect_weight_transfer (NCCL); the object store needs no state
        t = self.trainer
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        # `step` counts optimizer steps (minibatches per rollout batch), which the LR schedule follows.
        self.step = load_training_state(Path(resume_from), self.opt)["opt_steps"] if resume_from else 0

    def ready(self) -> int:
        return self.step

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def train_step(self, batch: RolloutBatch, step: int = 0) -> dict[str, float]:
        """One rollout batch's optimizer step(s). A non-finite loss, gradient norm or weight raises
        `NonFiniteError` naming the RL `step` before the optimizer applies it (or, for weights, before any
        sync or save can publish them)."""
        t0 = time.perf_counter()
        t, a = self.trainer, self.algo
        x = {k: v.to(self.device) for k, v in pack(batch, self.tokenizer.pad_token_id).items()}

        # No routing replay: the CPU engine cannot return routes (replaying them would need them packed like the rows).
        def logprobs(model, idx=slice(None)):
            return packed_logprobs(model, x["ids"][idx], x["lengths"][idx], a.pack_len, a.entropy_coef > 0,
                                   self.temperature, at=x["mask"][idx])

        # With one optimizer step per batch, every forward sees the weights that produced the batch: the
        # training forward's own logprobs (detached) are the old ones, and no separate pass is needed.
        old_lp = entropy = None
        with torch.no_grad():
            if a.minibatches > 1:
                self.model.eval()
                old_lp, entropy = logprobs(self.model)
                self.model.train()
            ref_lp = logprobs(self.ref)[0] if self.ref is not None else None
        B = x["ids"].shape[0]
        seen_lp, seen_entropy = torch.zeros_like(x["rollout_lp"]), torch.zeros_like(x["rollout_lp"])
        sums: dict[str, float] = {}
        for mb in torch.arange(B).chunk(a.minibatches):
            for g in self.opt.param_groups:
                g["lr"] = t.lr * lr_factor(self.step, t.warmup_steps, t.max_steps * a.minibatches, t.min_lr_ratio)
            for micro in mb.chunk(t.grad_accum):
                lp, ent = logprobs(self.model, micro)
                old = old_lp[micro] if old_lp is not None else lp.detach()
                if old_lp is None:
                    seen_lp[micro], seen_entropy[micro] = old, ent.detach()
                inputs = LossInputs(lp, old, x["rollout_lp"][micro], x["adv"][micro], x["mask"][micro],
                                    ref_lp[micro] if ref_lp is not None else None, ent)
                loss, m = policy_loss(inputs, a)
                check_finite(step, "the policy loss", loss)
                (loss * len(micro) / len(mb)).backward()
                for k, v in {"loss": float(loss.detach()), **m}.items():
                    sums[k] = sums.get(k, 0.0) + v * len(micro) / B
            all_reduce_grads(list(self.model.parameters()), self.world)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad_norm)
            check_finite(step, "the gradient norm", grad_norm)
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm) / a.minibatches
            self.opt.step()
            check_finite(step, "a weight after the optimizer step", floating_tensors(self.model))
            self.opt.zero_grad(set_to_none=True)
            all_reduce_router_load(self.model, self.world)
            self.model.update_router_biases(self.model_cfg.bias_update_speed)
            self.step += 1
        if old_lp is None:
            old_lp, entropy = seen_lp, seen_entropy
        tokens = x["mask"].sum()
        metrics: dict[str, float] = {"entropy": float((entropy * x["mask"]).sum() / tokens),
                                     "train/rollout_logprob_diff": float(((old_lp - x["rollout_lp"]).abs() * x["mask"]).sum() / tokens)}
        load = self.model.expert_load()
        if load.numel():
            ratios = load.max(1).values / load.min(1).values.clamp(min=1)
            metrics["moe/load_max_min_ratio"] = float(ratios.max())
            metrics.update({f"moe/layer{i}/load_max_min_ratio": float(v) for i, v in enumerate(ratios)})
        metrics.update({f"train/{k}": v for k, v in sums.items()})
        metrics["train/tokens"] = float(x["mask"].sum())
        metrics["train/seconds"] = time.perf_counter() - t0
        return metrics

    def connect_weight_transfer(self, workers: list, bucket_bytes: int) -> None:
        """NCCL: open a group to each rollout worker, once, before the first sync."""
        import ray

        from dspost.rollout.sync import NCCLTransport

        self.transport = NCCLTransport(bucket_bytes)
        self.transport.connect(workers, self._checkpoint_tensors, ray.util.get_node_ip_address(),
                               [free_port() for _ in workers])

    def _checkpoint_tensors(self):
        from dspost.model import hf_tensors
        from dspost.model.checkpoint import quantize_named

        named = hf_tensors(self.model, include_mtp=False)  # vLLM serves no MTP layers here
        quantize = self.cfg_quantize
        return quantize_named(named, quantize) if quantize != "none" else named

    def publish_weights(self, transport: str, bucket_bytes: int) -> list | None:
        """Object store: the current weights (HF names) in bucket refs. NCCL: pushed to the engines, None."""
        from dspost.rollout.sync import TRANSPORTS

        if self.transport is not None:
            return self.transport.publish()
        return TRANSPORTS[transport](bucket_bytes).publish(self._checkpoint_tensors())

    @torch.no_grad()
    def sequence_logprobs(self, seqs: list[list[int]]) -> list[list[float]]:
        self.model.eval()
        out = []
        for s in seqs:
            lp, _ = token_logprobs(self.model, torch.tensor([s], device=self.device))
            out.append(lp[0].tolist())
        self.model.train()
        return out

    def save(self, path: str, step: int) -> str:
        if self.rank == 0:
            save_training_checkpoint(Path(path), self.model, self.tokenizer, self.opt, step, {"opt_steps": self.step})
        return path

