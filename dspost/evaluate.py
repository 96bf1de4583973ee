"""The `evaluate` stage of a pipeline: held-out accuracy per domain of earlier stages' final checkpoints on vLLM, and
the pipeline report (`dspost/report.py`).

Rows: `start` (the checkpoint the first model stage started from), then every evaluated stage in pipeline order. Each
row is graded exactly as a GRPO run's evaluation grades (`dspost.rl.evaluate`: the domain's verifier in the scoring
pool's worker processes, `eval/<domain>/accuracy`). Checkpoints of one architecture and tokenizer (ours, same
`config.json`) share one engine: the first starts it (12-20 s on CPU), each next one has its weights pushed in
through the trainer's weight transport (`rollout/sync.py`, ~0.1 s for tiny-math) and is checked by a parity probe
against our model on that checkpoint. Each row's result is kept in `evaluation.json` as it is done, so a resumed
evaluation grades only the rows it has not (or whose checkpoint or settings changed)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dspost.config import MODEL_STAGE_KINDS, EvaluateRecipe
from dspost.report import START_ROW
from dspost.rundir import RunDir, write_text_atomic

if TYPE_CHECKING:
    from dspost.runner import PipelineState

RESULTS = "evaluation.json"


def checkpoints_to_evaluate(stage: EvaluateRecipe, pipeline: PipelineState) -> dict[str, Path]:
    """Row name -> checkpoint, in pipeline order: `start`, then `stage.stages` (default: every earlier model stage)."""
    rows: dict[str, Path] = {}
    first = next((n for n, s in pipeline.stages.items() if s.kind in MODEL_STAGE_KINDS and n in pipeline.starts), None)
    if first is not None:
        rows[START_ROW] = pipeline.starts[first]
    names = stage.stages or [n for n, s in pipeline.stages.items() if s.kind in MODEL_STAGE_KINDS]
    rows.update({n: pipeline.outputs[n] for n in names})
    return rows


def run_evaluate(stage: EvaluateRecipe, run: RunDir, pipeline: PipelineState, progress=None) -> Path:
    """Grade the rows not graded yet, keep every row's result in `evaluation.json`, write the pipeline report."""
    from dspost.report import build_report, write_report

    rows = checkpoints_to_evaluate(stage, pipeline)
    settings = settings_digest(stage)
    path = run.root / RESULTS
    kept = json.loads(path.read_text()).get("rows", {}) if stage.resume and path.is_file() else {}
    results = {row: kept[row] for row, ckpt in rows.items()
               if row in kept and kept[row].get("checkpoint") == str(ckpt) and kept[row].get("settings") == settings}
    todo = {row: ckpt for row, ckpt in rows.items() if row not in results}
    if len(todo) < len(rows):
        run.log.info("evaluation: %d of %d rows graded in an earlier attempt: %s", len(rows) - len(todo), len(rows),
                     ", ".join(r for r in rows if r not in todo))

    def keep(row: str, result: dict) -> None:
        results[row] = {**result, "settings": settings}
        write_text_atomic(path, json.dumps({"rows": results}, indent=1) + "\n")
        if progress is not None:
            progress(len(results), len(rows), result["metrics"])

    t0 = time.perf_counter()
    if todo:
        grade_checkpoints(stage, run, todo, keep)
    run.log.info("evaluation: %d rows graded in %.1f s", len(todo), time.perf_counter() - t0)
    report = build_report(stage, pipeline, {row: results[row] for row in rows})
    root = pipeline.root if pipeline.root is not None else run.root
    for written in write_report(report, root):
        run.log.info("wrote %s", written)
    return run.root


def settings_digest(stage: EvaluateRecipe) -> str:
    """What a row's grade depends on besides its checkpoint: held-out data, verifiers, decoding, engine dtype."""
    r = stage.rollout
    keys = {"data": stage.data.model_dump(mode="json"), "rewards": stage.rewards.model_dump(mode="json"),
            "eval": stage.eval.model_dump(mode="json"), "max_tokens": r.max_tokens, "stop": r.stop,
            "seed": stage.seed, "dtype": stage.dtype, "enforce_eager": r.enforce_eager}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def engine_key(path: Path) -> str | None:
    """Checkpoints with one key can share an engine by a weight push: our DeepseekV3 (unquantised), the same
    `config.json` and tokenizer. None: the checkpoint gets an engine of its own."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if cfg.get("model_type") != "deepseek_v3" or "quantization_config" in cfg:
        return None
    cfg = {k: v for k, v in cfg.items() if k not in ("_name_or_path", "transformers_version")}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (path / name).is_file():
            h.update((path / name).read_bytes())
    return h.hexdigest()


def serving_order(rows: dict[str, Path]) -> list[tuple[str, Path, str | None]]:
    """(row, checkpoint, engine key) with the rows of one key together, in the order their key first appears."""
    keyed = [(row, ckpt, engine_key(ckpt)) for row, ckpt in rows.items()]
    first: dict[str | None, int] = {}
    for i, (_, _, key) in enumerate(keyed):
        first.setdefault(key, i)
    return sorted(keyed, key=lambda item: first[item[2]] if item[2] is not None else keyed.index(item))


@dataclass
class Served:
    """The engine pool serving checkpoints of one key, and the held-out prompts tokenized for it."""
    pool: object  # dspost.rollout.pool.RolloutPool
    key: str | None
    held_out: object  # Mixture[Prompt]
    probe: list[list[int]]
    transport: object = None  # ObjectStoreTransport, connected on the first push
    version: int = 0


def grade_checkpoints(stage: EvaluateRecipe, run: RunDir, todo: dict[str, Path], keep) -> None:
    """Grade each checkpoint of `todo` on the held-out sets and hand each row's result to `keep(row, result)`."""
    from dspost.data.sources import load_mixture
    from dspost.distributed import start_ray
    from dspost.reward_terms import reward_terms
    from dspost.rewards import ScoringPool
    from dspost.rl import eval_decodings, evaluate

    train, held_out, bad = load_mixture(stage.data, need_targets=False)
    offsets = {d: len(part) for d, part in train.parts.items()}  # held-out rows are numbered after the training rows
    decodings = eval_decodings(stage.eval, stage.rollout)
    with contextlib.ExitStack() as running:
        ray, own_ray = start_ray(stage.ray)
        if own_ray:
            running.callback(ray.shutdown)
        scorer = running.enter_context(ScoringPool(stage.rewards.num_workers))
        terms = reward_terms(stage.rewards, scorer, run.log)
        served: Served | None = None
        running.callback(lambda: served is not None and served.pool.shutdown())
        for row, ckpt, key in serving_order(todo):
            t0 = time.perf_counter()
            if served is None or key is None or key != served.key:
                if served is not None:
                    served.pool.shutdown()
                    served = None
                served = start_engine(stage, run, ckpt, key, held_out, bad, offsets)
                how, parity = "started", {}
            else:
                parity = push_checkpoint(served, ckpt, stage.parity_threshold)
                how = "pushed"
            engine_seconds = time.perf_counter() - t0
            metrics = evaluate(served.pool, served.held_out, decodings, terms, stage.rewards, stage.seed, 0)
            seconds = time.perf_counter() - t0
            run.log.info("evaluated %s (%s): %s; engine %s in %.1f s, %.1f s in all", row, ckpt, json.dumps(metrics),
                         how, engine_seconds, seconds)
            keep(row, {"checkpoint": str(ckpt), "metrics": metrics,
                       "eval": {d: metrics.get(f"eval/{d}/accuracy") for d in held_out.domains},
                       "engine": how, "engine_seconds": round(engine_seconds, 3), "seconds": round(seconds, 3),
                       **parity})


def start_engine(stage: EvaluateRecipe, run: RunDir, ckpt: Path, key: str | None, held_out, bad,
                 offsets: dict) -> Served:
    """A rollout pool serving `ckpt`, the held-out prompts in its tokenizer (too long ones counted bad), and the
    parity probe (the first held-out prompts with their reference answers)."""
    from dspost.rl import fitting_prompts, pool_tokenizer
    from dspost.data.sources import source_label
    from dspost.rollout.pool import RolloutPool, WorkerSpec

    r = stage.rollout
    max_len = stage.data.max_seq_len
    engine_kwargs = {"dtype": stage.dtype, "memory_fraction": r.memory_fraction, "max_model_len": max_len + r.max_tokens,
                     "enforce_eager": r.enforce_eager, "seed": stage.seed, "kv_cache_gb": r.kv_cache_gb,
                     "weight_transfer": None}
    pool = RolloutPool(r.num_workers, str(ckpt), WorkerSpec(r.num_cpus_per_worker, r.num_gpus_per_worker,
                                                            r.num_threads, r.resources), engine_kwargs)
    try:
        tok = pool_tokenizer(ckpt)
        bad = copy.deepcopy(bad)  # this tokenizer's count: each engine start tokenizes the held-out rows anew
        prompts = held_out.map(lambda d, part: fitting_prompts(tok, part, max_len, bad[d], offsets[d]))
        for d, b in bad.items():
            b.check(stage.data.max_bad_fraction, source_label(stage.data, d))
        probe = [(p.ids + tok(p.example.messages[-1]["content"])["input_ids"])[:max_len + r.max_tokens]
                 for p in prompts.items[:4]]
    except BaseException:
        pool.shutdown()
        raise
    run.log.info("engine started on %s: %s", ckpt, ", ".join(f"{d}: {len(p)} held-out prompts"
                                                               for d, p in prompts.parts.items()))
    return Served(pool, key, prompts, probe)


def push_checkpoint(served: Served, ckpt: Path, threshold: float) -> dict[str, float]:
    """`ckpt`'s weights into the running engines, then the parity probe: the engine's logprobs against our model's on
    `ckpt` (`parity_max_abs`, refused beyond `threshold`), beside how far the push moved them (`change_max_abs`)."""
    import torch

    from dspost.model import from_pretrained, hf_tensors
    from dspost.rl import parity
    from dspost.rollout.sync import ObjectStoreTransport
    from dspost.trainer_worker import token_logprobs

    if served.transport is None:
        served.transport = ObjectStoreTransport(64 * 2**20)
        served.transport.connect(served.pool.workers)
        served.pool.rejoin = served.transport.rejoin
    model = from_pretrained(str(ckpt)).eval()
    before = served.pool.sequence_logprobs(served.probe)
    served.version += 1
    stats = served.transport.push(hf_tensors(model, include_mtp=False), served.version)
    with torch.no_grad():
        ours = [token_logprobs(model, torch.tensor([s]))[0][0].tolist() for s in served.probe]
    after = served.pool.sequence_logprobs(served.probe)
    checked = parity(after, ours, threshold)
    # How far the push moved the engine's logprobs: a parity far below it is a parity that saw the new weights.
    change = max(abs(a - b) for x, y in zip(after, before) for a, b in zip(x, y))
    return {"push_seconds": round(stats.seconds, 3), "parity_mean_abs": checked["sync/parity_mean_abs"],
            "parity_max_abs": checked["sync/parity_max_abs"], "change_max_abs": change}
