"""Weight transports from the trainer to the rollout engines: two wires, one shape.

    transport.connect(workers, host=model)     # once: the rollout worker actors (Ray handles); the trainer's model
    stats = transport.push(named, version)     # (HF name, tensor) pairs -> every engine serves `version`
    transport.rejoin(i, new_worker)            # a restarted worker i -> the last pushed weights

`push` returns only when the engines hold the weights, whatever the wire. `ObjectStoreTransport` (CPU; any
cluster) hands each worker host memory to load from: a shared-memory file on the trainer's node, buckets in
Ray's object store on other nodes; it keeps the last push so a restarted worker can rejoin. `NCCLTransport`
(GPU) broadcasts through vLLM's weight-transfer API (`rollout/nccl.py`); an engine that restarts cannot
rejoin its NCCL group. `host` is the trainer's model whose weights the pushes send (or None): the object store
moves its parameters into the shared-memory file, so a push hands the workers the trainer's own bytes.
"""

from __future__ import annotations

import os
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
    load_seconds: float = 0.0  # the slowest worker's own time to write the weights into its engine
    staged_bytes: int = 0  # bytes the sender copied on the way (0 when every tensor was read where it lies)
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


# --------------------------------------------------------------------------------- what a worker loads
@dataclass
class StoreBuckets:
    """Buckets in Ray's object store (workers on other nodes)."""
    refs: list

    def open(self, maps: dict, node: str) -> list[tuple[str, torch.Tensor]]:
        import ray

        return [p for b in ray.get(self.refs) for p in unpack_bucket(b, verify=b.node != node)]


@dataclass
class SharedWeights:
    """Tensors in the sender's shared-memory files (workers on its node): `files` as (path, size), and per
    tensor (name, dtype, shape, file index, byte offset)."""
    files: list[tuple[str, int]]
    layout: list[tuple[str, str, tuple[int, ...], int, int]]

    def open(self, maps: dict, node: str) -> list[tuple[str, torch.Tensor]]:
        for path, size in self.files:  # each file mapped once: later pushes find its pages mapped
            if path not in maps:
                maps[path] = _map(path, size)
        for path in [p for p in maps if not os.path.exists(p)]:
            del maps[path]  # a file the sender replaced (and unlinked)
        bufs = [maps[path] for path, _ in self.files]
        out = []
        for name, dtype, shape, file, off in self.layout:
            dt = getattr(torch, dtype)
            n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            out.append((name, bufs[file][off:off + n].view(dt).view(shape)))
        return out


def _map(path: str, size: int) -> torch.Tensor:
    import mmap

    with open(path, "r+b") as f:
        return torch.frombuffer(mmap.mmap(f.fileno(), size), dtype=torch.uint8)


def _aligned(tensors: Iterable[torch.Tensor]) -> tuple[list[int], int]:
    """Byte offsets of the tensors laid out in order, each 64-byte aligned, and the total size."""
    offsets, size = [], 0
    for x in tensors:
        size = -(-size // 64) * 64
        offsets.append(size)
        size += x.numel() * x.element_size()
    return offsets, size


class SharedSegment:
    """One shared-memory file of the sender, unlinked when this object goes away. `write` copies tensors in (the
    file is rewritten in place by every write; a bigger one replaces it when they do not fit); `host` moves
    parameters into it for good, so that `offset` finds them (and any view of them) where they lie."""

    def __init__(self):
        self.path, self.size, self.buf = "", 0, torch.empty(0, dtype=torch.uint8)

    def write(self, named: list[tuple[str, torch.Tensor]], file: int = 0) -> SharedWeights:
        """Copy the tensors in, in order, each 64-byte aligned (so a fused pair or an expert's gate and up
        lie back to back, as the engine's stacks do)."""
        offsets, size = _aligned(x for _, x in named)
        if size > self.size:
            self._create(size)
        layout = []
        for (name, x), off in zip(named, offsets):
            self.buf[off:off + x.numel() * x.element_size()].view(x.dtype).view(x.shape).copy_(x.detach())
            layout.append((name, str(x.dtype).removeprefix("torch."), tuple(x.shape), file, off))
        return SharedWeights([(self.path, self.size)], layout)

    @torch.no_grad()
    def host(self, params: list[torch.Tensor]) -> bool:
        """Move the tensors' (parameters', buffers') values into a new file (`p.data` becomes a view of it; the
        objects, and so an optimizer's references and state, stay). False, moving nothing, when the shared-memory
        filesystem has not the room: then pushes copy, as for any tensor that does not lie here."""
        offsets, size = _aligned(params)
        if not params or not self._create(size, shm_only=True):
            return False
        for p, off in zip(params, offsets):
            view = self.buf[off:off + p.numel() * p.element_size()].view(p.dtype).view(p.shape)
            view.copy_(p.data)
            p.data = view
        return True

    def offset(self, x: torch.Tensor) -> int | None:
        """The byte offset of `x` in this file when its bytes lie here, contiguous; else None."""
        if not self.size or not x.is_contiguous() or x.device.type != "cpu" or \
                x.untyped_storage().data_ptr() != self.buf.untyped_storage().data_ptr():
            return None
        return x.data_ptr() - self.buf.data_ptr()

    def _create(self, size: int, shm_only: bool = False) -> bool:
        import tempfile
        import weakref

        shm = "/dev/shm"
        # A container's /dev/shm is often 64 MiB: a file beyond its room is a SIGBUS at the first write.
        room = os.path.isdir(shm) and os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize >= size
        if shm_only and not room:
            return False
        fd, path = tempfile.mkstemp(prefix="dspost-weights-", dir=shm if room else None)
        os.ftruncate(fd, size)
        os.close(fd)
        if self.path:
            self._unlink()  # workers keep their mapping of the old file until they map the new one
        self._unlink = weakref.finalize(self, os.unlink, path)
        self.path, self.size, self.buf = path, size, _map(path, size)
        return True


def shared_weights(named: list[tuple[str, torch.Tensor]], hosted: SharedSegment,
                   staging: SharedSegment) -> tuple[SharedWeights, int]:
    """The tensors as shared files hold them, and the bytes copied: those lying in `hosted` where they lie, the rest
    copied into `staging`."""
    where = [hosted.offset(x) for _, x in named]
    files = [(hosted.path, hosted.size)] if any(o is not None for o in where) else []
    staged = [(k, x) for (k, x), o in zip(named, where) if o is None]
    copied = staging.write(staged, file=len(files)) if staged else SharedWeights([], [])
    rest = iter(copied.layout)
    layout = [next(rest) if o is None else (k, str(x.dtype).removeprefix("torch."), tuple(x.shape), 0, o)
              for (k, x), o in zip(named, where)]
    return SharedWeights(files + copied.files, layout), sum(x.numel() * x.element_size() for _, x in staged)


# ------------------------------------------------------------------------------------------- transports
class ObjectStoreTransport:
    """Host memory: workers on the trainer's node map one shared-memory file that every push rewrites in
    place; workers on other nodes get checksummed buckets through Ray's object store. Every worker loads
    (in parallel) before `push` returns; the file keeps the last push for `rejoin`.

    Why a file and not a new object per push for same-node workers: on these VMs a page touched for the
    first time costs 4-8x its copy, and each fresh object paid that on both sides (1 GB: puts of 0.13 to
    4 s). Integrity: only buckets that cross a wire are checksummed (xxh3) and verified, on a node other
    than the sender's; Ray moves them between nodes over TCP, whose 16-bit checksums are weak. On the
    sender's node the worker reads the very pages the sender wrote.

    A hosted model's parameters are the file's bytes: `rejoin` hands a restarted worker the trainer's weights as
    they are, which are the last push's only until the next optimizer step (the trainer refuses a rejoin after
    one, `TrainerWorker.rejoin_weight_transfer`)."""

    def __init__(self, bucket_bytes: int):
        self.bucket_bytes = bucket_bytes
        self.workers: list = []
        self.nodes: list[str] = []
        self.hosted = SharedSegment()  # the trainer's parameters, when `connect` was given them
        self.segment = SharedSegment()  # copies of the tensors that do not lie in `hosted`
        self.last: tuple[SharedWeights, StoreBuckets | None, int] | None = None  # kept for `rejoin`

    def connect(self, workers: list, host: torch.nn.Module | None = None) -> None:
        """`host`: the trainer's model. Its parameters move into a shared file, so a push of them (or of views of
        them, as `hf_tensors` gives) copies nothing on the sender: same-node workers read the trainer's own bytes
        (1 GB config: the sender's 0.094 s copy of a 0.315 s push, 2026-12-02)."""
        import ray

        self.workers = list(workers)
        self.node = ray.get_runtime_context().get_node_id()
        self.nodes = ray.get([w.node.remote() for w in self.workers])
        if host is not None and self.node in self.nodes:
            tensors = {id(t): t for t in host.state_dict(keep_vars=True).values()}  # parameters and buffers, once
            self.hosted.host([t for t in tensors.values() if t.device.type == "cpu"])

    def push(self, named: Named, version: int) -> PushStats:
        import ray

        t = time.perf_counter()
        named = list(named)
        local, staged = shared_weights(named, self.hosted, self.segment)
        remote = None
        if any(n != self.node for n in self.nodes):
            # from the tensors themselves: the same bytes as the shared file, without mapping it again
            remote = StoreBuckets([ray.put(b) for b in make_buckets(named, self.bucket_bytes, checksum=True,
                                                                     node=self.node)])
        self.last = (local, remote, version)
        missed, load = [], 0.0
        loads = [w.load_weights.remote(local if n == self.node else remote, version)
                 for w, n in zip(self.workers, self.nodes)]
        for i, done in enumerate(loads):
            try:
                load = max(load, ray.get(done))
            except ray.exceptions.RayActorError:
                missed.append(i)
        # the bytes of this push (the file may be larger: it keeps the size of the largest push so far)
        nbytes = sum(x.numel() * x.element_size() for _, x in named)
        return PushStats(nbytes, time.perf_counter() - t, len(local.layout), load, staged_bytes=staged,
                         missed=tuple(missed))

    def rejoin(self, index: int, worker) -> None:
        import ray

        self.workers[index], self.nodes[index] = worker, ray.get(worker.node.remote())
        if self.last is not None:
            local, remote, version = self.last
            if self.nodes[index] != self.node and remote is None:
                remote = StoreBuckets([ray.put(b) for b in make_buckets(local.open({}, self.node), self.bucket_bytes,
                                                                         node=self.node)])
            ray.get(worker.load_weights.remote(local if self.nodes[index] == self.node else remote, version))


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

    def connect(self, workers: list, host: torch.nn.Module | None = None) -> None:
        """`host` is not needed: the broadcast reads the tensors each push names from wherever they lie."""
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
