"""GPU weight sync through vLLM's weight-transfer API: trainer rank 0 broadcasts over NCCL and each engine
loads what arrives with the model's own `load_weights`, so the fused-MoE layout stays vLLM's business.

Each rollout worker is an independent vLLM instance, so each gets its own two-rank group (trainer rank 0,
engine rank 1). Engines must be started with `weight_transfer="nccl"` (see `VLLMEngine`). Written against
vLLM 0.32's API (`vllm.distributed.weight_transfer.nccl_engine`); the CPU-only machines this project is
tested on cannot run it, so no test covers it."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine


class NamedSource(WeightSource):
    """The (HF name, tensor) pairs of the current push (`NCCLTransport.push` sets `pairs`)."""

    def __init__(self):
        self.pairs: list[tuple[str, torch.Tensor]] = []

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.pairs]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.pairs)


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def connect(workers: list, source: NamedSource, bucket_bytes: int) -> list[NCCLTrainerWeightTransferEngine]:
    """Open one group per worker from this (trainer rank 0) process; `send_weights()` on each returned
    sender broadcasts `source`'s pairs to that engine."""
    import ray

    address = ray.util.get_node_ip_address()
    return [NCCLTrainerWeightTransferEngine.trainer_init(
                NCCLTrainerInitInfo(address, _free_port(), world_size=2, packed_buffer_size_bytes=bucket_bytes, rank=0),
                client=RolloutWorkerClient(w), source=source)
            for w in workers]
