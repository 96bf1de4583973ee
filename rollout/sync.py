"""Weight transport from the trainer pool to the rollout pool: named tensors in checksummed buckets.

`make_buckets` packs (name, tensor) pairs into flat byte buffers of about `bucket_bytes`; `unpack_bucket`
checks the checksum and rebuilds views. `ObjectStoreTransport` moves buckets through Ray's shared-memory
object store (CPU, and across nodes). `NCCLTransport` is for GPU pools through vLLM's weight-transfer API.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch


class SyncError(RuntimeError):
    pass


@dataclass
class Bucket:
    names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    offsets: list[int]
    data: np.ndarray  # uint8
    checksum: int

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def _checksum(data: np.ndarray) -> int:
    return zlib.adler32(memoryview(data)) & 0xFFFFFFFF


def make_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0

    def flush() -> Bucket:
        total = sum(t.numel() * t.element_size() for _, t in pending)
        data = np.empty(total, dtype=np.uint8)
        offsets, off = [], 0
        for _, t in pending:
            n = t.numel() * t.element_size()
            data[off: off + n] = t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy()
            offsets.append(off)
            off += n
        return Bucket([n for n, _ in pending], [str(t.dtype).removeprefix("torch.") for _, t in pending],
                      [tuple(t.shape) for _, t in pending], offsets, data, _checksum(data))

    for name, t in named:
        n = t.numel() * t.element_size()
        if pending and size + n > bucket_bytes:
            yield flush()
            pending, size = [], 0
        pending.append((name, t))
        size += n
    if pending:
        yield flush()


def unpack_bucket(bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    if _checksum(bucket.data) != bucket.checksum:
        raise SyncError(f"weight bucket starting at {bucket.names[0]} failed its checksum")
    buf = torch.from_numpy(bucket.data)
    out = []
    for name, dtype, shape, off in zip(bucket.names, bucket.dtypes, bucket.shapes, bucket.offsets):
        dt = getattr(torch, dtype)
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dt).element_size()
        out.append((name, buf[off: off + n].view(dt).view(shape)))
    return out


class ObjectStoreTransport:
    """Trainer side: `publish` puts buckets in Ray's object store and returns their refs; rollout side:
    `receive` fetches (zero-copy for the numpy payload) and unpacks them."""

    def __init__(self, bucket_bytes: int):
        self.bucket_bytes = bucket_bytes

    def publish(self, named: Iterable[tuple[str, torch.Tensor]]) -> list:
        import ray

        return [ray.put(b) for b in make_buckets(named, self.bucket_bytes)]

    @staticmethod
    def receive(refs: list) -> Iterator[list[tuple[str, torch.Tensor]]]:
        import ray

        for ref in refs:
            yield unpack_bucket(ray.get(ref))


class NCCLTransport:
    """GPU pools: trainer rank 0 broadcasts to every engine over NCCL with vLLM's weight-transfer API
    (`rollout/nccl.py`). `connect` opens the groups once; `publish` pushes the weights and returns no refs,
    because the engines already hold them when it returns."""

    def __init__(self, bucket_bytes: int):
        if not torch.cuda.is_available():
            raise SyncError("weight transport 'nccl' needs CUDA devices on the trainer and rollout workers; "
                            "use sync.transport=object_store on CPU")
        self.bucket_bytes = bucket_bytes
        self.senders: list = []

    def connect(self, workers: list, named, address: str, ports: list[int]) -> None:
        from dspost.rollout.nccl import connect

        self.senders = connect(workers, named, address, ports, self.bucket_bytes)

    def publish(self, named=None) -> None:
        if not self.senders:
            raise SyncError("weight transport 'nccl': publish before connect (no NCCL groups to the engines)")
        for sender in self.senders:
            sender.send_weights()
        return None


TRANSPORTS = {"object_store": ObjectStoreTransport, "nccl": NCCLTransport}
