"""GRPO-family RL: vLLM rollout actors and trainer actors on Ray, weights synced after every update.

What one step does, in order: generate `prompts_per_step x n` samples on the rollout pool -> score them
with the reward terms in worker processes -> group advantages (DAPO: drop all-equal groups, overlong
penalty) -> one or more optimizer steps on the trainer pool -> publish the new weights in checksummed
buckets and load them into every engine -> probe: engine vs trainer logprobs on a fixed batch -> every
`eval_every` steps held-out accuracy on the engines -> every `save_every` steps a checkpoint.
Deviations from the papers: the "old" policy is the trainer's own logprob before the update, and the
engine/trainer mismatch is corrected by a truncated importance weight (`algorithm.tis_cap`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from dspost.algorithms import group_advantages
from dspost.config import EvalSection, GRPORecipe, RewardsSection, RolloutSection, SyncSection
from dspost.critic_rewards import critic_terms, is_critic
from dspost.data.loading import Example, load_examples
from dspost.data.packing import batch_indices
from dspost.distributed import group_url, start_ray
from dspost.rewards import STATUSES, ScoringPool, resolve
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


def run_grpo(recipe: GRPORecipe, run: RunDir, model_path: Path, progress=None) -> Path:
    train, held_out, bad = load_examples(recipe.data)
    with contextlib.ExitStack() as running:  # whatever happens, no actor, pool or scorer outlives the run
        ray, own_ray = start_ray(recipe.ray)
        if own_ray:
            running.callback(ray.shutdown)
        return _run_grpo(recipe, run, model_path, progress, running, train, held_out, bad)


def _run_grpo(recipe, run, model_path, progress, running, train, held_out, bad) -> Path:
    r, t, a = recipe.rollout, recipe.trainer, recipe.algorithm
    resume_from = run.resume_from
    start = int(resume_from.name.split("_")[1]) if resume_from else 0
    serve_from = str(resume_from or model_path)
    pool, trainers = start_pools(recipe, serve_from, str(model_path), str(resume_from) if resume_from else None,
                                 running)
    run.log.info("placement: %s", placement(pool, trainers))
    tok = pool_tokenizer(model_path)
    n_train = len(train)
    train, prompts = fitting_prompts(tok, train, recipe.data.max_seq_len, bad, 0)
    held_out, eval_prompts = fitting_prompts(tok, held_out, recipe.data.max_seq_len, bad, n_train)
    bad.check(recipe.data.max_bad_fraction, recipe.data.path or "synthetic data")
    run.log.info("data: %d prompts, %d held out; bad rows: %s", len(prompts), len(eval_prompts), bad.summary())
    engine_len = recipe.data.max_seq_len + r.max_tokens
    probe = [(p + tok(ex.messages[-1]["content"])["input_ids"])[:engine_len] for p, ex in zip(eval_prompts, held_out[:4])]
    terms = [(resolve(term.name), term.weight, term.name, term.options) for term in recipe.rewards.terms
             if not is_critic(term.name)]
    critics = critic_terms(recipe.rewards, run.log)
    for c in critics:
        running.callback(c.close)
    sampling = SamplingConfig(n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, stop=r.stop)
    decodings = eval_decodings(recipe.eval, r)
    run.resumed(resume_from, start)
    final = resume_from
    with ScoringPool(recipe.rewards.num_workers) as scorer:
        prober = ParityProbe(probe, recipe.sync.parity_threshold)
        parity = prober.check(pool, trainers[0])
        if start == 0:
            acc = evaluate(pool, scorer, eval_prompts, held_out, decodings, terms, recipe.rewards, t.seed, 0)
            run.log_metrics(0, {**acc, **parity})
        for step in range(start, t.max_steps):
            times: dict[str, float] = {}
            with timed(times, "generate"):
                idx = batch_indices(len(prompts), r.prompts_per_step, step, t.seed)
                samples = pool.generate([prompts[i] for i in idx], sampling, seed=t.seed * 1_000_003 + step * 10_007)
            with timed(times, "score"):
                meta = {k: v for c in critics for k, v in c.check(step).items()}
                rewards, reward_metrics = score(scorer, samples, [train[idx[s.prompt_index]] for s in samples],
                                                terms, recipe.rewards, critics, step + 1)
            with timed(times, "advantages"):
                lengths = torch.tensor([float(len(s.response_ids)) for s in samples])
                adv, keep = group_advantages(a, rewards, lengths, r.n, r.max_tokens)
            with timed(times, "update"):
                train_metrics = update(trainers, samples, adv, keep, step + 1)
            with timed(times, "sync"):
                sync_seconds = sync(pool, trainers, recipe.sync, step + 1)
                if (step + 1) % recipe.sync.parity_every == 0:
                    parity = prober.check(pool, trainers[0])
            n = step + 1
            metrics = {**reward_metrics, **meta, **train_metrics, **parity, **times, "sync/seconds": sync_seconds,
                       "response/length_mean": sum(len(s.response_ids) for s in samples) / len(samples),
                       "perf/rollout_tokens_per_s": sum(len(s.response_ids) for s in samples) / times["time/generate"],
                       "perf/train_tokens_per_s": train_metrics.get("train/tokens", 0) / times["time/update"],
                       "data/kept_fraction": float(keep.float().mean())}
            if n % t.eval_every == 0 or n == t.max_steps:
                with timed(times, "eval"):
                    metrics.update(evaluate(pool, scorer, eval_prompts, held_out, decodings, terms, recipe.rewards,
                                            t.seed, n))
            if n % t.save_every == 0 or n == t.max_steps:
                with timed(times, "save"):
                    final = save(run, trainers, n)
            metrics.update(times)
            metrics["time/step"] = sum(v for k, v in times.items() if k.startswith("time/"))
            run.log_metrics(n, metrics)
            if progress is not None:
                progress(n, t.max_steps, metrics)
    return final


# ------------------------------------------------------------------------------------------ setup
def actor_get(refs):
    """`ray.get`, raising a trainer's own error (a non-finite loss, bad input) as itself rather than wrapped."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        raise e.cause from None


def fitting_prompts(tok, examples: list[Example], max_len: int, bad, offset: int) -> tuple[list[Example], list[list[int]]]:
    """The examples whose prompt fits `data.max_seq_len` tokens (the engine serves max_seq_len + max_tokens) and
    their token ids; longer ones are counted as bad rows instead of failing the engine mid-run."""
    kept, ids = [], []
    for i, ex in enumerate(examples):
        p = prompt_ids(tok, ex)
        if len(p) > max_len:
            bad.add(ex.row if ex.row is not None else offset + i, f"prompt longer than data.max_seq_len={max_len} tokens")
            continue
        kept.append(ex)
        ids.append(p)
    return kept, ids


def start_pools(recipe: GRPORecipe, serve_from: str, base_model: str, resume_from: str | None,
                running: contextlib.ExitStack):
    """The rollout pool and the trainer actors, each stopped by `running` when the run ends."""
    import ray

    from dspost.rollout.pool import RolloutPool, WorkerSpec

    r, t = recipe.rollout, recipe.trainer
    if recipe.sync.quantize != "none":  # the engines start as FP8 servers, in the format the syncs will send
        serve_from = quantized_copy(serve_from, recipe.sync.quantize, Path(recipe.output_dir) / "rollout_weights")
    engine_kwargs = {"dtype": recipe.model.dtype, "memory_fraction": r.memory_fraction,
                     "max_model_len": recipe.data.max_seq_len + r.max_tokens, "enforce_eager": r.enforce_eager,
                     "seed": t.seed, "kv_cache_gb": r.kv_cache_gb,
                     "weight_transfer": "nccl" if recipe.sync.transport == "nccl" else None}
    pool = RolloutPool(r.num_workers, serve_from,
                       WorkerSpec(r.num_cpus_per_worker, r.num_gpus_per_worker, r.num_threads, r.resources), engine_kwargs)
    running.callback(pool.shutdown)
    env = {"OMP_NUM_THREADS": str(t.num_threads)} if t.num_threads else {}
    actor = ray.remote(TrainerWorker).options(num_cpus=t.num_cpus_per_worker, num_gpus=t.num_gpus_per_worker,
                                              resources=t.resources or None, runtime_env={"env_vars": env})
    url = group_url() if t.num_workers > 1 else None
    trainers = [actor.remote(recipe, base_model, rank, t.num_workers, url, resume_from) for rank in range(t.num_workers)]
    running.callback(lambda: [ray.kill(w) for w in trainers])
    ray.get([w.ready.remote() for w in trainers])
    if recipe.sync.transport == "nccl":
        ray.get(trainers[0].connect_weight_transfer.remote(pool.workers, int(recipe.sync.bucket_mb * 2**20)))
    return pool, trainers


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


# ----------------------------------------------------------------------------------------- phases
def score(scorer: ScoringPool, samples: list[Sample], examples: list[Example], terms, cfg: RewardsSection,
          critics=(), step: int = 0):
    """Summed weighted rewards [N] and their metrics. A term whose `error` verdicts (rewards that could not be
    computed: a crashed scorer, no sandbox) exceed `rewards.max_error_fraction` stops the run: training on
    the zeros they score would teach the policy nothing true."""
    rewards = torch.zeros(len(samples))
    metrics: dict[str, float] = {}
    prompts = [next(m["content"] for m in reversed(ex.messages[:-1]) if m["role"] == "user") for ex in examples] \
        if critics else []
    for c in critics:
        values, failed = c.scores(prompts, [s.text for s in samples], [ex.answer for ex in examples])
        check_errors(step, c.name, failed, len(samples), cfg.max_error_fraction, "the critic gave no score")
        rewards += values
        metrics[f"reward/{c.key}/mean"], metrics[f"reward/{c.key}/error"] = float(values.mean()), failed
    for target, weight, name, options in terms:
        verdicts = scorer.map(target, [(s.text, {"answer": ex.answer, **ex.extra}) for s, ex in zip(samples, examples)],
                              cfg.timeout, options)
        errors = [v for v in verdicts if v.status == "error"]
        check_errors(step, name, len(errors), len(verdicts), cfg.max_error_fraction, errors[0].detail if errors else "")
        rewards += weight * torch.tensor([v.score for v in verdicts])
        for status in STATUSES:
            metrics[f"reward/{name}/{status}"] = sum(v.status == status for v in verdicts)
        metrics[f"reward/{name}/mean"] = sum(v.score for v in verdicts) / len(verdicts)
    metrics["reward/mean"], metrics["reward/std"] = float(rewards.mean()), float(rewards.std())
    if "reward/math/correct" in metrics:
        metrics["accuracy"] = metrics["reward/math/correct"] / len(samples)
    return rewards, metrics


def check_errors(step: int, term: str, errors: int, total: int, limit: float, first: str) -> None:
    if total and errors / total > limit:
        raise RewardError(f"step {step}: reward term {term!r} could not score {errors}/{total} samples (limit "
                          f"rewards.max_error_fraction={limit:g}); first: {first[:200]}")


def update(trainers: list, samples: list[Sample], adv: torch.Tensor, keep: torch.Tensor, step: int) -> dict[str, float]:
    chosen = [i for i in range(len(samples)) if keep[i]]
    if not chosen:
        return {"train/skipped": 1.0}
    shards = [chosen[k::len(trainers)] for k in range(len(trainers))]
    refs = [w.train_step.remote(RolloutBatch([samples[i].prompt_ids for i in sh], [samples[i].response_ids for i in sh],
                                             [samples[i].logprobs for i in sh], [float(adv[i]) for i in sh]), step)
            for w, sh in zip(trainers, shards)]
    results = actor_get(refs)
    return {k: sum(m[k] for m in results) / len(results) for k in results[0]}


def sync(pool, trainers: list, cfg: SyncSection, version: int) -> float:
    t = time.perf_counter()
    refs = actor_get(trainers[0].publish_weights.remote(cfg.transport, int(cfg.bucket_mb * 2**20)))
    pool.sync(refs, version)
    return time.perf_counter() - t


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


def eval_decodings(e: EvalSection, r: RolloutSection) -> dict[str, SamplingConfig]:
    """The configured held-out decoding, plus greedy beside it when that one samples."""
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=r.max_tokens, stop=r.stop)
    if e.temperature == 0:
        return {"eval/accuracy": greedy}
    return {"eval/accuracy": SamplingConfig(n=e.n, temperature=e.temperature, top_p=e.top_p,
                                            max_tokens=r.max_tokens, stop=r.stop),
            "eval/accuracy_greedy": greedy}


def evaluate(pool, scorer, prompts, examples, decodings: dict[str, SamplingConfig], terms, cfg: RewardsSection,
             seed, step: int) -> dict[str, float]:
    """Held-out math accuracy under each named decoding (mean correctness over all samples)."""
    math_target = next((tg for tg, _, name, _ in terms if name == "math"), resolve("math"))
    out = {}
    for key, decoding in decodings.items():
        samples = pool.generate(prompts, decoding, seed=seed)
        verdicts = scorer.map(math_target, [(s.text, {"answer": examples[s.prompt_index].answer}) for s in samples],
                              cfg.timeout)
        errors = [v for v in verdicts if v.status == "error"]
        check_errors(step, f"{key} (math)", len(errors), len(verdicts), cfg.max_error_fraction,
                     errors[0].detail if errors else "")
        out[key] = sum(v.status == "correct" for v in verdicts) / len(verdicts)
    return out


def save(run: RunDir, trainers: list, step: int) -> Path:
    path = run.checkpoint_path(step)
    actor_get(trainers[0].save.remote(str(path), step))
    run.mark_latest(step)
    return path
