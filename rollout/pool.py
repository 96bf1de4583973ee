"""The rollout pool: Ray actors that each own one vLLM engine; batches spread across them.

A worker that dies is restarted from the checkpoint it started with, brought up to the current weights from
the last sync's buckets (still in the object store), and its batch is re-run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dspost.rollout.engine import Sample, SamplingConfig, VLLMEngine
from dspost.rollout.sync import ObjectStoreTransport, SyncError


class RolloutWorker:
    """Body of the Ray actor (wrapped with `ray.remote` by the pool)."""

    def __init__(self, path: str, engine_kwargs: dict, threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.engine = VLLMEngine(path, **engine_kwargs)
        self.version = 0

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, seed: int, first_index: int) -> list[Sample]:
        return self.engine.generate(prompts, sampling, self.version, seed, first_index)

    def load_weights(self, refs: list | None, version: int) -> float:
        """Object-store buckets by ref; None when the weights already arrived over NCCL."""
        t = time.perf_counter()
        if refs is not None:
            self.engine.update_weights(ObjectStoreTransport.receive(refs))
        self.version = version
        return time.perf_counter() - t

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
        self.last_sync: tuple[list, int] | None = None
        self.restarts = 0

    def _start(self):
        return self.actor_cls.remote(self.path, self.engine_kwargs, self.spec.threads)

    def _restart(self, i: int) -> None:
        import ray

        if self.last_sync is not None and self.last_sync[0] is None:
            raise SyncError(f"rollout worker {i} died and a restarted engine cannot rejoin the trainer's NCCL "
                            "weight-transfer group; restart the run with resume=true")
        self.workers[i] = self._start()
        if self.last_sync is not None:
            ray.get(self.workers[i].load_weights.remote(*self.last_sync))
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

    def sync(self, refs: list | None, version: int) -> float:
        """Every worker loads the buckets (refs None: NCCL already delivered the weights) before the next
        generation; returns the slowest worker's seconds."""
        import ray

        self.last_sync = (refs, version)
        seconds = []
        for i, w in enumerate(self.workers):
            try:
                seconds.append(ray.get(w.load_weights.remote(refs, version)))
            except ray.exceptions.RayActorError:
                self._restart(i)
        return max(seconds, default=0.0)

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
