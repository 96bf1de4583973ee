"""The teacher pool of on-policy distillation (`kind: opd`): Ray actors that score the student's sampled tokens
under frozen teachers, each sample by the teacher of its domain.

Per sample and response position a teacher returns its logprob of the sampled token under log_softmax(z / T) at
the ROLLOUT temperature T, the distribution the student sampled from. Scoring at T=1 instead makes the student learn
the teacher flattened to an effective temperature 1/T (slime PR #2085 scored at 0). For the `topk` and `full`
estimators it also returns its top-k (with any ids asked for beside them, e.g. the student's top-k) or its whole
tempered rows.

Backends (`teachers[i].backend`), measured by `benchmarks/teacher_scoring.py` (128 samples, tiny-math, 2 cores):
- `torch` (default): a plain forward through the trainer's own `packed_logprobs` (padding-free packed rows, the head
  only at response positions). Exact at any T, any support (the student's top-k included), full rows in 0.34x the
  wall time of vLLM's full-vocabulary prompt logprobs; starts in 5-10 s. Its eager forward takes 2.0x the wall time
  (2.3x the CPU) of vLLM's compiled prefill for the sampled tokens.
- `vllm`: prompt logprobs with the head scaled by 1/T (vLLM 0.32's prompt logprobs ignore the request's temperature:
  up to 0.95 nats, mean 0.19, off at T=0.6), checked against the plain forward at start; sampled tokens and top-k
  only. 1.01x the raw vLLM call's wall time (1.06x its CPU). It saves ~0.35 s per 128-sample step, which repays its
  12-20 s engine start (30-50 s before `rollout/engine.py` turned vLLM's AOT compilation off) after ~35-60 steps:
  worth it for long runs, not for the pipeline's short OPD stage.

    pool = TeacherPool(teacher_specs(recipe.teachers, paths), dtype="float32", row_len=recipe.algorithm.pack_len)
    pool.check_tokenizer(student_path)     # one line naming teachers[i].path when a vocabulary differs
    scores = pool.score(samples, domains, recipe.rollout.temperature, k=32, student_topk=topk_ids)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from dspost.config import TeacherSection
    from dspost.rollout.engine import Sample


class TeacherError(ValueError):
    """A teacher that cannot score for this student (its tokenizer, its checkpoint, the domains it serves)."""


@dataclass
class TeacherScores:
    """One sample's teacher scores, at its response positions only (R = its response length), float32."""

    token_logprobs: np.ndarray
    """[R] log q_T(y_t | prefix): the teacher's logprob of each sampled token at the rollout temperature."""
    support_ids: np.ndarray | None = None
    """[R, K] int32: the teacher's top-k ids (the first k columns, in descending order), then the extra ids asked for
    and the sampled token, each id once; repeats are -1 (K = k + extra ids + 1)."""
    support_logprobs: np.ndarray | None = None
    """[R, K] log q_T at `support_ids`, -inf where the id is -1."""
    rows: np.ndarray | None = None
    """[R, V] the teacher's whole tempered log-softmax rows (the `full` estimator)."""


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher of the pool, as the recipe's `teachers[i]` describes it with its checkpoint resolved."""

    name: str
    path: str
    domains: tuple[str, ...] = ()
    weight: float = 1.0
    num_cpus: float = 0
    num_gpus: float = 0
    threads: int | None = None  # None: its CPUs, or every core of its node when colocated
    backend: str = "torch"  # torch | vllm (see TeacherWorker)

    @property
    def colocated(self) -> bool:
        """It reserves no CPU and no GPU: it shares the pools' cores, which it alternates with."""
        return self.num_cpus == 0 and self.num_gpus == 0


def teacher_names(sections: list[TeacherSection]) -> list[str]:
    """`teachers[i].name`, else its only domain, else `teacher<i>`."""
    return [t.name or (t.domains[0] if len(t.domains) == 1 else f"teacher{i}") for i, t in enumerate(sections)]


def teacher_specs(sections: list[TeacherSection], paths: list[str]) -> list[TeacherSpec]:
    """The recipe's teachers with their checkpoints (`path`, or the earlier stage's output the runner resolved)."""
    return [TeacherSpec(name, str(path), tuple(t.domains), t.weight, t.num_cpus, t.num_gpus, t.num_threads, t.backend)
            for name, t, path in zip(teacher_names(sections), sections, paths, strict=True)]


def vocab_fingerprint(tokenizer) -> str:
    """sha256 of the sorted (token, id) vocabulary and the special tokens' ids: equal fingerprints mean every token
    id names the same string, so a teacher can score the student's ids."""
    special = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk")}
    text = json.dumps([sorted(tokenizer.get_vocab().items()), special, sorted(tokenizer.all_special_ids)])
    return hashlib.sha256(text.encode()).hexdigest()


def head_rows(path: str | Path) -> int:
    """The vocabulary size of a checkpoint's output head (`vocab_size` in its config.json)."""
    return int(json.loads((Path(path) / "config.json").read_text())["vocab_size"])


# ------------------------------------------------------------------------------------------------- the actor
class _KeepLogits:
    """The teacher's forward in `packed_logprobs`' calling convention (ours, or a transformers model through
    `TransformersForward`); it keeps the [n, V] logits it returns (the selected positions, in `packed_logprobs`'
    order: sample by sample, position by position) for the top-k and full outputs."""

    def __init__(self, model):
        from dspost.trainer_worker import forward_of

        self.forward, self.logits = forward_of(model), None

    def __call__(self, ids, position_ids, segment_ids, logits_at):
        out = self.forward(ids, position_ids=position_ids, segment_ids=segment_ids, logits_at=logits_at)
        self.logits = out.logits
        return out


class TorchScorer:
    """The plain forward: the trainer's `packed_logprobs` on the teacher (ours, or any transformers causal LM)."""

    def __init__(self, path: str, dtype: str, row_len: int, pad_id: int):
        import torch

        from dspost.lora import load_base
        from dspost.model import DeepseekV3
        from dspost.trainer_worker import check_packing
        from dspost.training import device

        self.device = device()
        model = load_base(path, dtype=getattr(torch, dtype))
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.ours = isinstance(model, DeepseekV3)
        self.row_len, self.pad_id = row_len, pad_id
        if not self.ours:
            check_packing(self.model, head_rows(path), path)

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]], temperature: float, k: int,
              full: bool, extra: torch.Tensor | None) -> list[TeacherScores]:
        import torch

        from dspost.trainer_worker import RolloutBatch, pack, packed_logprobs

        lengths = [len(r) for r in response_ids]
        batch = RolloutBatch(prompt_ids, response_ids, [[0.0] * n for n in lengths], [0.0] * len(lengths))
        x = pack(batch, self.pad_id)
        mask = x["mask"].bool()
        forward = _KeepLogits(self.model)
        with torch.no_grad():
            lp, _ = packed_logprobs(forward, x["ids"].to(self.device), x["lengths"], self.row_len,
                                    temperature=temperature, at=mask)
            tokens = lp[mask.to(self.device)]  # [N], sample by sample
            rows = support = None
            if k or full or extra is not None:
                rows = (forward.logits.float() / temperature).log_softmax(-1)
                V = rows.shape[-1]
                if k > V or (extra is not None and extra.numel() and not 0 <= int(extra.min()) <= int(extra.max()) < V):
                    raise TeacherError(f"top-k: k={k} and the extra ids must lie within the teacher's vocabulary "
                                       f"of {V}")
                if k or extra is not None:
                    targets = x["ids"][:, 1:][mask].to(self.device)
                    support = _support(rows, targets, k, extra.to(self.device) if extra is not None else None)
        return _split(lengths, tokens, support, rows if full else None)


class VLLMScorer:
    """vLLM's prompt logprobs, made exact at the rollout temperature through the head: the engine's logits processor
    scales the logits by 1/T. Its prompt logprobs skip the sampler, so a request's temperature never reaches them
    (T=0.6 and T=1 give identical values); the scale is applied after any soft-capping, so z/T is exact (2e-6 from
    the plain forward). Checked at start against the plain forward at T=0.7."""

    CHECK_TEMPERATURE = 0.7

    def __init__(self, path: str, dtype: str, engine: dict, reference: TorchScorer, threshold: float):
        from dspost.rollout.engine import VLLMEngine

        self.engine = VLLMEngine(path, dtype=dtype, **engine)
        # Top-k up to the whole vocabulary (vLLM's default refuses k > 20); prompt logprobs are computed on demand.
        self.engine.llm.llm_engine.model_config.max_logprobs = -1
        self.base_scale = self.engine.llm.collective_rpc(_logit_scale)[0]
        self.temperature = 1.0
        self._check(reference, threshold, head_rows(path))

    def _check(self, reference: TorchScorer, threshold: float, V: int) -> None:
        """Random ids through both backends at T=0.7: sampled-token and top-4 logprobs within `threshold`."""
        import torch

        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 9, 13, 3)]
        responses = [torch.randint(0, V, (n,), generator=g).tolist() for n in (12, 7, 4, 20)]
        T, k = self.CHECK_TEMPERATURE, 4
        ours = self.score(prompts, responses, T, k, False, None)
        theirs = reference.score(prompts, responses, T, k, False, None)
        gap = max(float(np.abs(a.token_logprobs - b.token_logprobs).max()) for a, b in zip(ours, theirs))
        gap = max([gap] + [float(np.abs(a.support_logprobs[:, :k] - b.support_logprobs[:, :k]).max())
                           for a, b in zip(ours, theirs)])
        if not gap <= threshold:
            raise TeacherError(f"vllm teacher backend: its logprobs at T={T} differ from the plain forward's by up to "
                               f"{gap:.3g} nats (> {threshold:g}): this engine does not serve the tempered teacher")

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]], temperature: float, k: int,
              full: bool, extra: torch.Tensor | None) -> list[TeacherScores]:
        import torch
        from vllm import SamplingParams

        if full or extra is not None:
            raise TeacherError("vllm teacher backend: full rows cost 9-13x its sampled-token logprobs, and logprobs at "
                               "given ids (the student's top-k) need vLLM's V2 model runner (Triton, no CPU backend); "
                               "use the torch backend")
        if temperature != self.temperature:
            self.engine.llm.collective_rpc(_set_logit_scale, args=(self.base_scale / temperature,))
            self.temperature = temperature
        seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
        # Flat logprobs: per position the target token, then the top-k in rank order, as plain lists (no Logprob
        # object per entry); vLLM reports positions 1..L-1, so position j is row j-1.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False, flat_logprobs=True)
        outs = self.engine.llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)
        ids, lps = [], []
        for p, s, o in zip(prompt_ids, seqs, outs):
            flat = o.prompt_logprobs
            rows = slice(len(p) - 1, len(s) - 1)
            ids.append(np.asarray(flat.token_ids, dtype=np.int64).reshape(len(s) - 1, 1 + k)[rows])
            lps.append(np.asarray(flat.logprobs, dtype=np.float32).reshape(len(s) - 1, 1 + k)[rows])
        ids_t, lps_t = torch.from_numpy(np.concatenate(ids)), torch.from_numpy(np.concatenate(lps))
        # support order as the torch backend's: the top-k first, then the sampled token
        support = _once(ids_t.roll(-1, 1), lps_t.roll(-1, 1)) if k else None
        return _split([len(r) for r in response_ids], lps_t[:, 0].contiguous(), support, None)


def _logit_scale(worker) -> float:
    return float(worker.model_runner.get_model().logits_processor.scale)


def _set_logit_scale(worker, scale: float) -> None:
    worker.model_runner.get_model().logits_processor.scale = scale


class TeacherWorker:
    """Body of a teacher's Ray actor: one frozen checkpoint and its tokenizer, scoring token ids without gradients
    through the `torch` backend (the plain forward) or the `vllm` one (prompt logprobs; no full rows, no extra ids)."""

    def __init__(self, path: str, dtype: str = "float32", threads: int | None = None, row_len: int = 256,
                 backend: str = "torch", engine: dict | None = None, check_threshold: float = 1e-3):
        import torch

        from dspost.model import load_tokenizer

        # None: every core this process may use. A colocated teacher reserves no CPU (Ray would give it one
        # thread) and runs while the rollout and trainer pools wait.
        torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        self.tokenizer = load_tokenizer(path)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.path = path
        self.scorer = TorchScorer(path, dtype, row_len, pad_id)
        if backend == "vllm":
            self.scorer = VLLMScorer(path, dtype, engine or {}, self.scorer, check_threshold)
        elif backend != "torch":
            raise TeacherError(f"teacher backend {backend!r}: expected torch or vllm")

    def ready(self) -> str:
        return self.path

    def vocab_fingerprint(self) -> str:
        return vocab_fingerprint(self.tokenizer)

    def vocab_sizes(self) -> tuple[int, int]:
        """(tokenizer entries, output-head rows)."""
        return len(self.tokenizer), head_rows(self.path)

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]], temperature: float, k: int = 0,
              full: bool = False, extra_ids: list[np.ndarray] | None = None) -> list[TeacherScores]:
        """Each sample's `TeacherScores` at the rollout `temperature`: the sampled tokens' logprobs; with `k` > 0 or
        `extra_ids` ([R_i, E] ids per sample, e.g. the student's top-k) the support (teacher top-k, extra ids,
        sampled token) and its logprobs; with `full` the whole rows."""
        if not temperature > 0:
            raise TeacherError(f"teacher scoring needs the rollout temperature > 0 (got {temperature}): a greedy "
                               "rollout has no sampling distribution to distil")
        extra = _stack_extra(extra_ids, [len(r) for r in response_ids]) if extra_ids is not None else None
        return self.scorer.score(prompt_ids, response_ids, temperature, k, full, extra)


def _stack_extra(extra_ids: list[np.ndarray], lengths: list[int]) -> torch.Tensor:
    """The per-sample [R_i, E] extra ids as one [N, E] tensor; a sample whose shape disagrees is refused."""
    import torch

    arrays = [np.asarray(e, dtype=np.int64) for e in extra_ids]
    widths = {a.shape[1] for a in arrays if a.ndim == 2}
    for i, (a, n) in enumerate(zip(arrays, lengths, strict=True)):
        if a.ndim != 2 or a.shape[0] != n or len(widths) != 1:
            raise TeacherError(f"extra ids of sample {i}: shape {a.shape}, expected [{n}, E] with one E for every "
                               f"sample (widths seen: {sorted(widths)})")
    return torch.from_numpy(np.concatenate(arrays))


def _support(rows: torch.Tensor, targets: torch.Tensor, k: int,
             extra: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The topk estimator's support: [N, K] ids (teacher top-k in descending order, `extra`, the sampled token) and
    the tempered logprobs there, each id once (see `_once`)."""
    import torch

    parts = ([rows.topk(k, -1).indices] if k else []) + ([extra] if extra is not None else []) + [targets[:, None]]
    ids = torch.cat(parts, 1)
    return _once(ids, rows.gather(1, ids))


def _once(ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An id repeated in its row (after its first column) becomes -1 with logprob -inf, so the tail mass
    1 - sum(exp(.)) counts each id once; ids as int32."""
    import torch

    K = ids.shape[1]
    before = torch.ones(K, K, dtype=torch.bool, device=ids.device).tril(-1)  # [j, i]: column i comes before j
    repeat = ((ids[:, :, None] == ids[:, None, :]) & before).any(-1)
    return ids.masked_fill(repeat, -1).to(torch.int32), logprobs.masked_fill(repeat, float("-inf"))


def _split(lengths: list[int], tokens: torch.Tensor, support, rows) -> list[TeacherScores]:
    """Flat [N, ...] results back into one `TeacherScores` per sample (numpy views, on the CPU)."""
    def per_sample(t):
        return [a.numpy() for a in t.cpu().split(lengths)] if t is not None else [None] * len(lengths)

    ids, support_lp = support if support is not None else (None, None)
    return [TeacherScores(*f)
            for f in zip(per_sample(tokens), per_sample(ids), per_sample(support_lp), per_sample(rows))]


# -------------------------------------------------------------------------------------------------- the pool
class TeacherPool:
    """One Ray actor per teacher; each sample is scored by the teacher of its domain (a teacher without domains
    serves every domain no other teacher claims), and results come back in sample order."""

    def __init__(self, teachers: list[TeacherSpec], dtype: str = "float32", row_len: int = 256,
                 engine: dict | None = None, check_threshold: float = 1e-3):
        """`row_len`: the packed rows of the torch backend (`algorithm.pack_len`); `engine`: `VLLMEngine` arguments of
        the vllm backend (as the rollout pool's), whose start check allows `check_threshold` nats
        (`sync.parity_threshold`)."""
        import ray

        from dspost.rl import actor_get

        self.teachers = teachers
        self.by_domain = _routes(teachers)
        self.workers = []
        for t in teachers:
            env = {"OMP_NUM_THREADS": str(t.threads)} if t.threads else {}
            if t.backend == "vllm":  # the engine core in the actor's process: no pickling of weights across processes
                env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            actor = ray.remote(TeacherWorker).options(num_cpus=t.num_cpus, num_gpus=t.num_gpus,
                                                      runtime_env={"env_vars": env}, max_concurrency=1)
            threads = t.threads or (int(t.num_cpus) if t.num_cpus >= 1 else None)
            self.workers.append(actor.remote(t.path, dtype, threads, row_len, t.backend, engine, check_threshold))
        for i, w in enumerate(self.workers):
            try:
                actor_get(w.ready.remote())
            except Exception as e:
                self.shutdown()
                # An actor that died in __init__ reports the traceback, its last line the error itself.
                lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
                raise TeacherError(f"teachers[{i}].path: {teachers[i].path}: cannot load the teacher: "
                                   f"{lines[-1]}") from None

    def route(self, domains: list[str]) -> list[int]:
        """The index of the teacher that scores each sample, from the sample's domain."""
        out = []
        for j, d in enumerate(domains):
            i = self.by_domain.get(d, self.by_domain.get(None))
            if i is None:
                raise TeacherError(f"sample {j}: no teacher serves domain {d!r} (teachers[i].domains: "
                                   f"{[list(t.domains) for t in self.teachers]})")
            out.append(i)
        return out

    def score(self, samples: list[Sample], domains: list[str], temperature: float, k: int = 0, full: bool = False,
              student_topk: list[np.ndarray] | None = None) -> list[TeacherScores]:
        """Each sample's `TeacherScores` from its domain's teacher, in sample order (see `TeacherWorker.score`)."""
        from dspost.rl import actor_get

        if len(domains) != len(samples) or (student_topk is not None and len(student_topk) != len(samples)):
            raise TeacherError(f"teacher scoring: {len(samples)} samples, {len(domains)} domains"
                               + (f", {len(student_topk)} student top-k arrays" if student_topk is not None else ""))
        owner = self.route(domains)
        out: list[TeacherScores | None] = [None] * len(samples)
        pending = []
        for i, w in enumerate(self.workers):
            idx = [j for j, o in enumerate(owner) if o == i]
            if not idx:
                continue
            ref = w.score.remote([samples[j].prompt_ids for j in idx], [samples[j].response_ids for j in idx],
                                 temperature, k, full, [student_topk[j] for j in idx] if student_topk else None)
            pending.append((idx, ref))
            if self.teachers[i].colocated:  # colocated teachers share the cores: one at a time
                _place(out, *pending.pop(), actor_get)
        for idx, ref in pending:
            _place(out, idx, ref, actor_get)
        return out  # type: ignore[return-value]

    def check_tokenizer(self, student_path: str | Path) -> None:
        """Refuse, in one line naming `teachers[i].path`, a teacher whose token ids mean other strings than the
        student's, or whose head has another number of rows: OPD scores the student's ids with the teacher."""
        from dspost.model import load_tokenizer
        from dspost.rl import actor_get

        student = load_tokenizer(str(student_path))
        ours, our_rows = vocab_fingerprint(student), head_rows(student_path)
        prints = actor_get([w.vocab_fingerprint.remote() for w in self.workers])
        sizes = actor_get([w.vocab_sizes.remote() for w in self.workers])
        for i, (t, fp, (tokens, rows)) in enumerate(zip(self.teachers, prints, sizes)):
            if fp != ours:
                raise TeacherError(f"teachers[{i}].path: {t.path}: tokenizer differs from the student's "
                                   f"({student_path}; vocab {tokens} vs {len(student)}): OPD scores the student's "
                                   "token ids with the teacher")
            if rows != our_rows:
                raise TeacherError(f"teachers[{i}].path: {t.path}: output head has {rows} rows, the student's "
                                   f"{our_rows}: the teacher's distribution is over other ids than the student's")

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
        self.workers = []


def _routes(teachers: list[TeacherSpec]) -> dict[str | None, int]:
    """domain -> teacher index (None: the teacher without domains); a domain claimed twice, or two teachers without
    domains, is refused."""
    routes: dict[str | None, int] = {}
    for i, t in enumerate(teachers):
        for d in t.domains or (None,):
            if d in routes:
                what = f"domain {d!r}" if d is not None else "every domain (no domains set)"
                raise TeacherError(f"teachers[{i}].domains: {what} is already served by teachers[{routes[d]}]")
            routes[d] = i
    return routes


def _place(out: list, idx: list[int], ref, get) -> None:
    for j, scores in zip(idx, get(ref), strict=True):
        out[j] = scores
