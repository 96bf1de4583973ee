"""Weight transports from the trainer to the rollout engines: two wires, one shape.

    transport.connect(workers)                 # once: the rollout worker actors (Ray handles)
    stats = transport.push(named, version)     # (HF name, tensor) pairs -> every engine serves `version`
    transport.rejoin(i, new_worker)            # a restarted worker i -> the last pushed weights

`push` returns only when the engines hold the weights, whatever the wire. `ObjectStoreTransport` puts the
tensors in buckets into Ray's shared-memory object store (CPU; any cluster) and has each worker load them;
it keeps the last push so a restarted worker can rejoin. `NCCLTransport` (GPU) broadcasts through vLLM's
weight-transfer API (`rollout/nccl.py`); an engine that restarts cannot rejoin its NCCL group.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

Named = Iterable[tuple[str, torch.Tensor]]


class SyncError(RuntimeError):
    pass


@dataclass
class PushStats:
    bytes: int
    seconds: float
    tensors: int
    missed: tuple[int, ...] = ()  # workers found dead (the pool restarts them, and they rejoin)


# ---------------------------------------------------------------------------------------------- buckets
@dataclass
class Bucket:
    """Tensors as uint8 arrays: `ray.put` copies them out of band into the object store (the only copy on
    the sender) and `ray.get` hands the receiver read-only views of that shared memory (no copy)."""
    names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    arrays: list[np.ndarray]
    checksum: int | None  # xxh3-64 over the arrays; None when no receiver is across a wire
    node: str = ""  # the Ray node that built it (a receiver there maps the very bytes written)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays)


def _checksum(arrays: list[np.ndarray]) -> int:
    """xxh3-64: 9.4 GB/s here against zlib's adler32 at 1.8 GB/s (256 MiB, 2026-12-02), so a check costs
    less than the copy it guards."""
    import xxhash

    h = xxhash.xxh3_64()
    for a in arrays:
        h.update(a)
    return h.intdigest()


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a uint8 numpy view (a copy only if it is not contiguous)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def make_buckets(named: Named, bucket_bytes: int, checksum: bool = True, node: str = "") -> Iterator[Bucket]:
    """Group (name, tensor) pairs into buckets of about `bucket_bytes`. The arrays are views of the tensors,
    so a bucket must be `ray.put` (or used) before the tensors change."""
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0

    def flush() -> Bucket:
        arrays = [_as_bytes(t) for _, t in pending]
        return Bucket([n for n, _ in pending], [str(t.dtype).removeprefix("torch.") for _, t in pending],
                      [tuple(t.shape) for _, t in pending], arrays, _checksum(arrays) if checksum else None, node)

    for name, t in named:
        n = t.numel() * t.element_size()
        if pending and size + n > bucket_bytes:
            yield flush()
            pending, size = [], 0
        pending.append((name, t))
        size += n
    if pending:
        yield flush()


def unpack_bucket(bucket: Bucket, verify: bool = True) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views of the bucket's bytes; the checksum is verified when there is one and `verify`."""
    if verify and bucket.checksum is not None and _checksum(bucket.arrays) != bucket.checksum:
        raise SyncError(f"weight bucket starting at {bucket.names[0]} failed its checksum")
    out = []
    with warnings.catch_warnings():  # object-store arrays are read-only; the engine only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, dtype, shape, a in zip(bucket.names, bucket.dtypes, bucket.shapes, bucket.arrays):
            out.append((name, torch.from_numpy(a).view(getattr(torch, dtype)).view(shape)))
    return out


# ------------------------------------------------------------------------------------------- transports
class ObjectStoreTransport:
    """Buckets through Ray's object store; every worker loads them (in parallel) before `push` returns.

    Integrity: a bucket is checksummed only when some worker runs on another node, and only such a worker
    verifies it: on the sender's node the worker maps the very pages the sender wrote (nothing crosses a
    wire), while Ray's transfer between nodes rides on TCP's 16-bit checksums."""

    def __init__(self, bucket_bytes: int):
        self.bucket_bytes = bucket_bytes
        self.workers: list = []
        self.last: tuple[list, int] | None = None  # the last push's bucket refs, kept for `rejoin`
        self.wire = False

    def connect(self, workers: list) -> None:
        import ray

        self.workers = list(workers)
        self.node = ray.get_runtime_context().get_node_id()
        self.wire = any(n != self.node for n in ray.get([w.node.remote() for w in self.workers]))

    def push(self, named: Named, version: int) -> PushStats:
        import ray

        t = time.perf_counter()
        refs, nbytes, count = [], 0, 0
        for b in make_buckets(named, self.bucket_bytes, checksum=self.wire, node=self.node):
            refs.append(ray.put(b))
            nbytes, count = nbytes + b.nbytes, count + len(b.names)
        self.last = (refs, version)
        missed = []
        for i, done in enumerate([w.load_weights.remote(refs, version) for w in self.workers]):
            try:
                ray.get(done)
            except ray.exceptions.RayActorError:
                missed.append(i)
        return PushStats(nbytes, time.perf_counter() - t, count, tuple(missed))

    def rejoin(self, index: int, worker) -> None:
        import ray

        self.workers[index] = worker
        if self.last is not None:
            ray.get(worker.load_weights.remote(*self.last))


class NCCLTransport:
    """GPU pools: trainer rank 0 broadcasts to each engine over NCCL with vLLM's weight-transfer API
    (`rollout/nccl.py`), and vLLM loads what arrives with the model's own `load_weights`. Written against
    vLLM 0.32's API; never run (these machines have no CUDA vLLM)."""

    def __init__(self, bucket_bytes: int):
        if not torch.cuda.is_available():
            raise SyncError("weight transport 'nccl' needs CUDA devices on the trainer and rollout workers; "
                            "use sync.transport=object_store on CPU")
        self.bucket_bytes = bucket_bytes
        self.workers: list = []
        self.senders: list = []

    def connect(self, workers: list) -> None:
        from dspost.rollout.nccl import NamedSource, connect

        self.workers, self.source = list(workers), NamedSource()
        self.senders = connect(self.workers, self.source, self.bucket_bytes)

    def push(self, named: Named, version: int) -> PushStats:
        import ray

        if not self.senders:
            raise SyncError("weight transport 'nccl': push before connect (no NCCL groups to the engines)")
        t = time.perf_counter()
        self.source.pairs = list(named)
        for sender in self.senders:
            sender.send_weights()
        ray.get([w.set_version.remote(version) for w in self.workers])
        nbytes = sum(x.numel() * x.element_size() for _, x in self.source.pairs)
        return PushStats(nbytes, time.perf_counter() - t, len(self.source.pairs))

    def rejoin(self, index: int, worker) -> None:
        raise SyncError(f"rollout worker {index} died and a restarted engine cannot rejoin the trainer's NCCL "
                        "weight-transfer group; restart the run with resume=true")


TRANSPORTS = {"object_store": ObjectStoreTransport, "nccl": NCCLTransport}
