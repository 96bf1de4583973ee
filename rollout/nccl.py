"""GPU weight sync through vLLM's weight-transfer API: trainer rank 0 broadcasts over NCCL and each engine
loads what arrives with the model's own `load_weights`, so the fused-MoE layout stays vLLM's business.

Each rollout worker is an independent vLLM instance, so each gets its own two-rank group (trainer rank 0,
engine rank 1). Engines must be started with `weight_transfer="nccl"` (see `VLLMEngine`). Written against
vLLM's API (`vllm.distributed.weight_transfer.nccl_engine`); the CPU-only machines this project is tested
on cannot run it, so no test covers it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine


class NamedSource(WeightSource):
    """The trainer's weights in checkpoint (HF) names, re-read on every pass."""

    def __init__(self, named: Callable[[], Iterable[tuple[str, torch.Tensor]]]):
        self.named = named

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.named()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.named())


class RolloutWorkerClient:
    """vLLM's four-method weight-sync client, spoken to one of our rollout worker actors."""

    def __init__(self, worker):
        self.worker = worker

    def _call(self, method: str, **kwargs) -> None:
        import ray

        ray.get(self.worker.weight_transfer_rpc.remote(method, kwargs))

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._call("init_weight_transfer_engine", init_info=init_info)

    def start_weight_update(self) -> None:
        self._call("start_weight_update")

    def update_weights(self, update_info) -> None:
        self._call("update_weights", update_info=update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._call("finish_weight_update")


def connect(workers: list, named: Callable[[], Iterable[tuple[str, torch.Tensor]]], address: str,
            ports: list[int], bucket_bytes: int) -> list[NCCLTrainerWeightTransferEngine]:
    """Open one group per worker; returns the senders whose `send_weights()` pushes the current weights."""
    source = NamedSource(named)
    return [NCCLTrainerWeightTransferEngine.trainer_init(
                NCCLTrainerInitInfo(address, port, world_size=2, packed_buffer_size_bytes=bucket_bytes, rank=0),
                client=RolloutWorkerClient(w), source=source)
            for w, port in zip(workers, ports)]
