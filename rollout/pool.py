"""The rollout pool: Ray actors that each own one vLLM engine; batches spread across them.

Weights reach the workers through a transport (`rollout/sync.py`), which whoever holds it connects to
`pool.workers`. A worker that dies is restarted from the checkpoint it started with, brought to the current
weights by `pool.rejoin` (the holder's `transport.rejoin`), and its batch is re-run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from collections.abc import Callable

from dspost.rollout.engine import Sample, SamplingConfig, VLLMEngine
from dspost.rollout.sync import SharedWeights, StoreBuckets


class RolloutWorker:
    """Body of the Ray actor (wrapped with `ray.remote` by the pool)."""

    def __init__(self, path: str, engine_kwargs: dict, threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.engine = VLLMEngine(path, **engine_kwargs)
        self.version = 0
        self.maps: dict = {}  # the transport's shared-memory file, mapped once

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, seed: int, first_index: int) -> list[Sample]:
        return self.engine.generate(prompts, sampling, self.version, seed, first_index)

    def load_weights(self, source: SharedWeights | StoreBuckets, version: int) -> float:
        """The object-store transport's push into the engine; returns the seconds it took."""
        t = time.perf_counter()
        self.engine.update_weights(source.open(self.maps, self.node()))
        self.version = version
        return time.perf_counter() - t

    def set_version(self, version: int) -> None:
        """The NCCL transport delivered the weights (through `weight_transfer_rpc`)."""
        self.version = version

    def weight_transfer_rpc(self, method: str, kwargs: dict) -> None:
        """vLLM's weight-transfer calls (init, start, update, finish) on this engine's workers."""
        self.engine.llm.collective_rpc(method, kwargs=kwargs)

    def sequence_logprobs(self, seqs: list[list[int]]) -> list[list[float]]:
        return self.engine.sequence_logprobs(seqs)

    def returns_routes(self) -> bool:
        return self.engine.returns_routes

    def get_version(self) -> int:
        return self.version

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


@dataclass
class WorkerSpec:
    num_cpus: float = 1
    num_gpus: float = 0
    threads: int | None = None
    resources: dict = field(default_factory=dict)  # custom Ray resources (pin to nodes)


class RolloutPool:
    def __init__(self, n: int, path: str, spec: WorkerSpec, engine_kwargs: dict):
        import ray

        self.path, self.spec, self.engine_kwargs = path, spec, engine_kwargs
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if spec.threads:
            env["OMP_NUM_THREADS"] = str(spec.threads)
        self.actor_cls = ray.remote(RolloutWorker).options(
            num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, resources=spec.resources or None,
            runtime_env={"env_vars": env}, max_concurrency=1)
        self.workers = [self._start() for _ in range(n)]
        ray.get([w.get_version.remote() for w in self.workers])  # wait until every engine is up
        self.restarts = 0
        # Brings a restarted worker to the current weights: set by whoever holds the weight transport, e.g.
        # `pool.rejoin = transport.rejoin` (None before any transport: the checkpoint is current).
        self.rejoin: Callable[[int, object], None] | None = None

    def _start(self):
        return self.actor_cls.remote(self.path, self.engine_kwargs, self.spec.threads)

    def _restart(self, i: int) -> None:
        self.workers[i] = self._start()
        if self.rejoin is not None:
            self.rejoin(i, self.workers[i])
        self.restarts += 1

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, seed: int) -> list[Sample]:
        import ray

        n = len(self.workers)
        bounds = [(len(prompts) * i // n, len(prompts) * (i + 1) // n) for i in range(n)]
        results: list[list[Sample] | None] = [None] * n
        pending = {i: self._submit(i, prompts, bounds[i], sampling, seed) for i in range(n) if bounds[i][0] < bounds[i][1]}
        for i in range(n):
            if i not in pending:
                results[i] = []
        while pending:
            for i, ref in list(pending.items()):
                try:
                    results[i] = ray.get(ref)
                    del pending[i]
                except ray.exceptions.RayActorError:
                    self._restart(i)
                    pending[i] = self._submit(i, prompts, bounds[i], sampling, seed)
        return [s for chunk in results for s in chunk]

    def _submit(self, i, prompts, bound, sampling, seed):
        lo, hi = bound
        return self.workers[i].generate.remote(prompts[lo:hi], sampling, seed + lo, lo)

    def sequence_logprobs(self, seqs: list[list[int]]) -> list[list[float]]:
        import ray

        return ray.get(self.workers[0].sequence_logprobs.remote(seqs))

    def nodes(self) -> list[str]:
        import ray

        return ray.get([w.node.remote() for w in self.workers])

    def versions(self) -> list[int]:
        import ray

        return ray.get([w.get_version.remote() for w in self.workers])

    def returns_routes(self) -> bool:
        import ray

        return all(ray.get([w.returns_routes.remote() for w in self.workers]))

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
