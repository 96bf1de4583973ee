"""What every RL stage runs on: the rollout pool and the trainer actors on Ray, the prompts, the reward terms, the
parity probe, held-out evaluation and checkpoints. GRPO (`dspost/grpo.py`) and on-policy distillation
(`dspost/opd.py`) are each one loop over these phases; neither copies them.

    with rl_session(recipe, run, model_path) as rl:      # pools up; everything torn down whatever happens
        for step in rl.steps():
            samples, examples = rl.generate(step)          # vLLM rollout actors
            ...                                            # the stage's own signal: rewards, teacher scores
            train = rl.update(samples, advantages, step)   # trainer actors
            sync = rl.sync(step)                           # weights into every engine + parity probe
            rl.end_step(step, metrics, times)              # eval every eval_every, save every save_every, log
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dspost.config import EvalSection, GRPORecipe, OPDRecipe, RewardsSection, RolloutSection
from dspost.data.loading import BadRows, Example
from dspost.data.sources import Mixture, load_mixture, source_label
from dspost.distributed import group_url, start_ray
from dspost.reward_terms import CriticTerm, RuleTerm, reward_terms, verifier
from dspost.rewards import ScoringPool
from dspost.rollout.engine import Sample, SamplingConfig
from dspost.rundir import RunDir
from dspost.trainer_worker import RolloutBatch, TrainerWorker


class ParityError(RuntimeError):
    pass


class RewardError(RuntimeError):
    """More of a step's rewards could not be computed than `rewards.max_error_fraction` allows."""


@contextlib.contextmanager
def timed(times: dict[str, float], phase: str):
    t = time.perf_counter()
    yield
    times[f"time/{phase}"] = time.perf_counter() - t


def actor_get(refs):
    """`ray.get`, raising an actor's own error (a non-finite loss, bad input) as itself rather than wrapped."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        raise e.cause from None


@dataclass
class Prompt:
    example: Example
    ids: list[int]  # the chat-templated prompt's token ids


@dataclass
class RLSession:
    """One RL stage's running state. Built by `rl_session`; the phases are its methods."""

    recipe: GRPORecipe | OPDRecipe
    run: RunDir
    pool: object  # dspost.rollout.pool.RolloutPool
    trainers: list
    terms: list[RuleTerm | CriticTerm]
    train: Mixture[Prompt]  # training prompts, by data source
    held_out: Mixture[Prompt]
    prober: ParityProbe
    start: int  # the first step to run (after the resumed checkpoint's)
    final: Path | None = None  # the newest checkpoint
    parity: dict[str, float] = field(default_factory=dict)
    model_path: Path | None = None  # the checkpoint the stage started from (under LoRA: the frozen base)
    running: contextlib.ExitStack | None = None  # what the session stops when it ends (a stage adds its own actors)

    def steps(self) -> range:
        return range(self.start, self.recipe.trainer.max_steps)

    # ------------------------------------------------------------------------------------------- phases
    def generate(self, step: int) -> tuple[list[Sample], list[Example]]:
        """`rollout.prompts_per_step` prompts x `rollout.n` samples, drawn as a function of (seed, step)."""
        r, t = self.recipe.rollout, self.recipe.trainer
        prompts = self.train.items
        idx = self.train.batch(r.prompts_per_step, step, t.seed)
        sampling = SamplingConfig(n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, stop=r.stop)
        samples = self.pool.generate([prompts[i].ids for i in idx], sampling, seed=t.seed * 1_000_003 + step * 10_007)
        return samples, [prompts[idx[s.prompt_index]].example for s in samples]

    def score(self, samples: list[Sample], examples: list[Example], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The summed weighted rewards of the recipe's terms [N] and their metrics, the meta-critic's included
        (terms of weight 0 only grade evaluation)."""
        terms = [term for term in self.terms if term.weight != 0]
        meta = {k: v for term in terms for k, v in term.check(step).items()}
        rewards, metrics = score(terms, samples, examples, self.recipe.rewards, step + 1)
        return rewards, {**metrics, **meta}

    def update(self, samples: list[Sample], advantages: torch.Tensor, keep: torch.Tensor, step: int,
               **per_sample) -> dict[str, float]:
        """The kept samples' update on the trainer pool, shared round-robin over its ranks; `per_sample` lists
        (e.g. teacher logprobs) travel with their samples."""
        chosen = [i for i in range(len(samples)) if keep[i]]
        if not chosen:
            return {"train/skipped": 1.0}
        n = len(self.trainers)
        shards = [chosen[k::n] for k in range(n)]
        refs = [w.train_step.remote(RolloutBatch([samples[i].prompt_ids for i in sh], [samples[i].response_ids for i in sh],
                                                 [samples[i].logprobs for i in sh], [float(advantages[i]) for i in sh],
                                                 **{k: [v[i] for i in sh] for k, v in per_sample.items()}), step + 1)
                for w, sh in zip(self.trainers, shards)]
        return combine_ranks(actor_get(refs))

    def sync(self, step: int) -> dict[str, float]:
        """The trainer's weights into every engine, then (every `sync.parity_every` syncs) the parity probe."""
        t = time.perf_counter()
        metrics = actor_get(self.trainers[0].publish_weights.remote(step + 1))
        metrics["sync/seconds"] = time.perf_counter() - t
        if (step + 1) % self.recipe.sync.parity_every == 0:
            self.parity = self.prober.check(self.pool, self.trainers[0])
        return {**metrics, **self.parity}

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out accuracy under the recipe's decodings (see `evaluate`)."""
        return evaluate(self.pool, self.held_out, eval_decodings(self.recipe.eval, self.recipe.rollout), self.terms,
                        self.recipe.rewards, self.recipe.trainer.seed, step)

    def end_step(self, step: int, metrics: dict[str, float], times: dict[str, float], progress=None) -> None:
        """Evaluate and save when due, then log the step's metrics and its phases' times."""
        t, n = self.recipe.trainer, step + 1
        if n % t.eval_every == 0 or n == t.max_steps:
            with timed(times, "eval"):
                metrics.update(self.evaluate(n))
        if n % t.save_every == 0 or n == t.max_steps:
            with timed(times, "save"):
                self.final = self.save(n)
        metrics.update(times)
        metrics["time/step"] = sum(v for k, v in times.items() if k.startswith("time/"))
        self.run.log_metrics(n, metrics)
        if progress is not None:
            progress(n, t.max_steps, metrics)

    def output(self) -> Path | None:
        """The stage's output: its newest checkpoint, or under LoRA, whose checkpoints hold adapters, that adapter
        merged into the base (`merged/`, as SFT LoRA writes), a full checkpoint later stages and vLLM load."""
        if self.recipe.trainer.lora is None or self.final is None:
            return self.final
        from dspost.lora import merge_lora

        merged = merge_lora(self.final, self.run.root / "merged", base=self.model_path)
        self.run.log.info("merged the LoRA adapter of %s into %s", self.final, merged)
        return merged

    def save(self, step: int) -> Path:
        path = self.run.checkpoint_path(step)
        actor_get(self.trainers[0].save.remote(str(path), step))
        self.run.mark_latest(step)
        return path


@contextlib.contextmanager
def rl_session(recipe: GRPORecipe | OPDRecipe, run: RunDir, model_path: Path) -> Iterator[RLSession]:
    """Start the pools, load and fit the prompts, set up the reward terms and the probe, and (on a fresh run)
    evaluate step 0; on exit, whatever happened, no actor, engine, scorer or critic outlives the run."""
    train, held_out, bad = load_mixture(recipe.data, need_targets=False)
    with contextlib.ExitStack() as running:
        ray, own_ray = start_ray(recipe.ray)
        if own_ray:
            running.callback(ray.shutdown)
        resume_from = run.resume_from
        start = int(resume_from.name.split("_")[1]) if resume_from else 0
        lora = recipe.trainer.lora is not None  # LoRA checkpoints hold adapters: the engines serve the frozen base
        pool, trainers = start_pools(recipe, str(model_path if lora else resume_from or model_path), str(model_path),
                                     str(resume_from) if resume_from else None, running)
        run.log.info("placement: %s", placement(pool, trainers))
        tok = pool_tokenizer(model_path)
        max_len = recipe.data.max_seq_len
        n_train = {d: len(part) for d, part in train.parts.items()}
        train = train.map(lambda d, part: fitting_prompts(tok, part, max_len, bad[d], 0))
        held_out = held_out.map(lambda d, part: fitting_prompts(tok, part, max_len, bad[d], n_train[d]))
        for d, b in bad.items():
            b.check(recipe.data.max_bad_fraction, source_label(recipe.data, d))
            run.log.info("data %s: %d prompts, %d held out; bad rows: %s", d or "", len(train.parts[d]),
                         len(held_out.parts[d]), b.summary())
        engine_len = max_len + recipe.rollout.max_tokens
        probe = [(p.ids + tok(p.example.messages[-1]["content"])["input_ids"])[:engine_len] for p in held_out.items[:4]]
        scorer = running.enter_context(ScoringPool(recipe.rewards.num_workers))
        terms = reward_terms(recipe.rewards, scorer, run.log)
        for term in terms:
            running.callback(term.close)
        run.resumed(resume_from, start)
        rl = RLSession(recipe, run, pool, trainers, terms, train, held_out,
                       ParityProbe(probe, recipe.sync.parity_threshold), start, resume_from, model_path=model_path,
                       running=running)
        if lora and resume_from:  # the resumed adapters' merged tensors turn the served base into the resumed policy
            actor_get(trainers[0].publish_weights.remote(start))
        rl.parity = rl.prober.check(pool, trainers[0])
        if start == 0:
            run.log_metrics(0, {**rl.evaluate(0), **rl.parity})
        yield rl


def combine_ranks(results: list[dict[str, float]]) -> dict[str, float]:
    """The trainer ranks' step metrics as one: token counts (`.../tokens`) add up, the per-teacher reverse KLs are
    token-weighted means (`opd/<t>/reverse_kl` by `opd/<t>/tokens`, `opd/reverse_kl` by `train/tokens`), the rest
    are plain means over the ranks (each rank's share of the batch is equal)."""
    out = {}
    for k in dict.fromkeys(k for m in results for k in m):
        have = [m for m in results if k in m]
        if k.endswith("tokens"):
            out[k] = sum(m[k] for m in have)
        elif k.startswith("opd/") and k.endswith("reverse_kl"):
            weight = k[: -len("reverse_kl")] + "tokens" if k != "opd/reverse_kl" else "train/tokens"
            total = sum(m.get(weight, 0.0) for m in have)
            out[k] = sum(m[k] * m.get(weight, 0.0) for m in have) / total if total else 0.0
        else:
            out[k] = sum(m[k] for m in have) / len(have)
    return out


# ------------------------------------------------------------------------------------------------ setup
def start_pools(recipe: GRPORecipe | OPDRecipe, serve_from: str, base_model: str, resume_from: str | None,
                running: contextlib.ExitStack):
    """The rollout pool and the trainer actors, each stopped by `running` when the run ends."""
    import ray

    from dspost.rollout.pool import RolloutPool, WorkerSpec

    r, t = recipe.rollout, recipe.trainer
    if recipe.sync.quantize != "none":  # the engines start as FP8 servers, in the format the syncs will send
        serve_from = quantized_copy(serve_from, recipe.sync.quantize, Path(recipe.output_dir) / "rollout_weights")
    pool = RolloutPool(r.num_workers, serve_from,
                       WorkerSpec(r.num_cpus_per_worker, r.num_gpus_per_worker, r.num_threads, r.resources),
                       engine_kwargs(recipe))
    running.callback(pool.shutdown)
    env = {"OMP_NUM_THREADS": str(t.num_threads)} if t.num_threads else {}
    actor = ray.remote(TrainerWorker).options(num_cpus=t.num_cpus_per_worker, num_gpus=t.num_gpus_per_worker,
                                              resources=t.resources or None, runtime_env={"env_vars": env})
    url = group_url() if t.num_workers > 1 else None
    trainers = [actor.remote(recipe, base_model, rank, t.num_workers, url, resume_from) for rank in range(t.num_workers)]
    running.callback(lambda: [ray.kill(w) for w in trainers])
    ray.get([w.ready.remote() for w in trainers])
    actor_get(trainers[0].connect_weight_transfer.remote(pool.workers))
    pool.rejoin = lambda i, worker: actor_get(trainers[0].rejoin_weight_transfer.remote(i, worker))
    return pool, trainers


def engine_kwargs(recipe: GRPORecipe | OPDRecipe) -> dict:
    """`VLLMEngine` arguments of the rollout engines (and of vLLM-backed teachers, which score the same sequences)."""
    r = recipe.rollout
    return {"dtype": recipe.model.dtype, "memory_fraction": r.memory_fraction,
            "max_model_len": recipe.data.max_seq_len + r.max_tokens, "enforce_eager": r.enforce_eager,
            "seed": recipe.trainer.seed, "kv_cache_gb": r.kv_cache_gb,
            "weight_transfer": "nccl" if recipe.sync.transport == "nccl" else None}


def quantized_copy(path: str, fmt: str, out: Path) -> str:
    from dspost.model import from_pretrained, load_tokenizer, save_pretrained

    save_pretrained(from_pretrained(path), out, tokenizer=load_tokenizer(path), quantization=fmt)
    return str(out)


def placement(pool, trainers) -> str:
    import ray

    nodes = [f"rollout[{i}]@{n}" for i, n in enumerate(pool.nodes())]
    nodes += [f"trainer[{i}]@{n}" for i, n in enumerate(ray.get([w.node.remote() for w in trainers]))]
    return " ".join(nodes)


def pool_tokenizer(path: Path):
    from dspost.model import load_tokenizer

    return load_tokenizer(str(path))


def prompt_ids(tok, ex: Example) -> list[int]:
    return list(tok.apply_chat_template(ex.messages[:-1], tokenize=True, add_generation_prompt=True,
                                        return_dict=True)["input_ids"])


def fitting_prompts(tok, examples: list[Example], max_len: int, bad: BadRows, offset: int) -> list[Prompt]:
    """The prompts that fit `data.max_seq_len` tokens (the engine serves max_seq_len + max_tokens), tokenized;
    longer ones are counted as bad rows instead of failing the engine mid-run."""
    kept = []
    for i, ex in enumerate(examples):
        p = prompt_ids(tok, ex)
        if len(p) > max_len:
            bad.add(ex.row if ex.row is not None else offset + i, f"prompt longer than data.max_seq_len={max_len} tokens")
            continue
        kept.append(Prompt(ex, p))
    return kept


# ------------------------------------------------------------------------------------- rewards and eval
def score(terms: list[RuleTerm | CriticTerm], samples: list[Sample], examples: list[Example], cfg: RewardsSection,
          step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed weighted rewards [N] and their metrics. A term that could not score more than
    `rewards.max_error_fraction` of its samples (a crashed scorer, no sandbox, a failed critic) stops the run:
    training on the zeros it gives them would teach the policy nothing true."""
    rewards = torch.zeros(len(samples))
    metrics: dict[str, float] = {}
    graded: dict[int, torch.Tensor] = {}
    for k, term in enumerate(terms):
        scores = term.score(samples, examples)
        check_errors(step, term.name, scores.errors, scores.scored, cfg.max_error_fraction, scores.first_error)
        rewards += scores.values
        metrics.update(scores.metrics)
        if scores.correct is not None:
            graded[k] = scores.correct
    metrics["reward/mean"], metrics["reward/std"] = float(rewards.mean()), float(rewards.std())
    domains = sorted({ex.domain for ex in examples}, key=str)
    for d in domains:  # the rollouts each domain's verifier grades correct
        v = verifier(terms, d)
        if v is not None:
            mine = torch.tensor([ex.domain == d for ex in examples])
            key = "train/accuracy" if d is None else f"train/{d}/accuracy"
            metrics[key] = float(graded[terms.index(v)][mine].float().mean())
    return rewards, metrics


def check_errors(step: int, term: str, errors: int, total: int, limit: float, first: str) -> None:
    if total and errors / total > limit:
        raise RewardError(f"step {step}: reward term {term!r} could not score {errors}/{total} samples (limit "
                          f"rewards.max_error_fraction={limit:g}); first: {first[:200]}")


def eval_decodings(e: EvalSection, r: RolloutSection) -> dict[str, SamplingConfig]:
    """The configured held-out decoding, plus greedy beside it when that one samples."""
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=r.max_tokens, stop=r.stop)
    if e.temperature == 0:
        return {"eval/accuracy": greedy}
    return {"eval/accuracy": SamplingConfig(n=e.n, temperature=e.temperature, top_p=e.top_p,
                                            max_tokens=r.max_tokens, stop=r.stop),
            "eval/accuracy_greedy": greedy}


def evaluate(pool, held_out: Mixture[Prompt], decodings: dict[str, SamplingConfig], terms: list[RuleTerm | CriticTerm],
             cfg: RewardsSection, seed: int, step: int) -> dict[str, float]:
    """Held-out accuracy under each named decoding: the fraction of samples the domain's verifier (its first rule
    term: math, code, instruct, ...) grades correct, `eval/<domain>/accuracy` per source and their mean as
    `eval/accuracy`. A domain without a verifier reports its mean summed reward (`eval/<domain>/reward`)."""
    prompts = held_out.items
    out = {}
    for key, decoding in decodings.items():
        samples = pool.generate([p.ids for p in prompts], decoding, seed=seed)
        per_domain = []
        for d in held_out.domains:
            mine = [s for s in samples if prompts[s.prompt_index].example.domain == d]
            examples = [prompts[s.prompt_index].example for s in mine]
            name = key if d is None else key.replace("eval/", f"eval/{d}/")
            v = verifier(terms, d)
            if v is None:
                out[name.replace("accuracy", "reward")] = float(score(terms, mine, examples, cfg, step)[0].mean())
                continue
            verdicts = v.verdicts(mine, examples)
            errors = [x for x in verdicts if x.status == "error"]
            check_errors(step, f"{v.name} ({name})", len(errors), len(verdicts), cfg.max_error_fraction,
                         errors[0].detail if errors else "")
            out[name] = sum(x.status == "correct" for x in verdicts) / len(verdicts)
            per_domain.append(out[name])
        if held_out.domains != [None] and per_domain:
            out[key] = sum(per_domain) / len(per_domain)
    return out


# ------------------------------------------------------------------------------------------ parity probe
class ParityProbe:
    """Engine vs trainer logprobs on a fixed batch after every sync: a sync that did not move the engine's weights
    shows up here. Beside the parity it reports how far the trainer's policy moved on the probe since the last
    check (`sync/policy_change_max`): a parity far below that change is a parity that saw the new weights."""

    def __init__(self, probe: list[list[int]], threshold: float):
        self.probe, self.threshold, self.last = probe, threshold, None

    def check(self, pool, trainer) -> dict[str, float]:
        ours = actor_get(trainer.sequence_logprobs.remote(self.probe))
        metrics = parity(pool.sequence_logprobs(self.probe), ours, self.threshold)
        if self.last is not None:
            metrics["sync/policy_change_max"] = max(abs(a - b) for x, y in zip(ours, self.last) for a, b in zip(x, y))
        self.last = ours
        return metrics


def parity(engine: list[list[float]], trainer: list[list[float]], threshold: float) -> dict[str, float]:
    """Mean and max |engine - trainer| logprob over the probe's tokens; raises `ParityError` beyond `threshold`
    and on a non-finite difference (NaN compares false with any threshold)."""
    diffs = torch.cat([(torch.tensor(e) - torch.tensor(o)).abs() for e, o in zip(engine, trainer, strict=True)])
    mean, mx = float(diffs.mean()), float(diffs.max())
    if not mx <= threshold:
        raise ParityError(f"sync parity: engine and trainer logprobs differ by up to {mx:.3g} nats (mean {mean:.3g}) "
                          f"> sync.parity_threshold={threshold}: the rollout engine is not serving the trainer's weights")
    return {"sync/parity_mean_abs": mean, "sync/parity_max_abs": mx}
