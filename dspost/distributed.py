"""What every multi-worker trainer shares: connecting to Ray, one torch.distributed group (gloo on CPU,
nccl on GPU), gradients averaged over it, and the router load summed over it, so that every rank makes
the same aux-loss-free bias update and the replicas never drift apart."""

from __future__ import annotations

import os
import socket

import torch


def start_ray(cfg):
    """Join `ray.address` / `RAY_ADDRESS`, or start a local cluster; returns (ray, whether we started it)."""
    import ray

    if ray.is_initialized():  # a caller (or a test) already connected us
        return ray, False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # address="local": a new cluster of our own, never one another process of this machine started
        ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return ray, True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def group_url() -> str:
    import ray

    return f"tcp://{ray.util.get_node_ip_address()}:{free_port()}"


def init_group(rank: int, world: int, url: str | None) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method=url,
                                rank=rank, world_size=world)


def all_reduce_grads(params: list[torch.Tensor], world: int) -> None:
    """Average gradients over the group in one flat all-reduce (a parameter without a gradient on one rank,
    e.g. an expert no local token reached, contributes zeros)."""
    if world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(p).clone()
        offset += g.numel()


def all_reduce_router_load(model, world: int) -> None:
    """Sum each router's accumulated expert load over the group before the bias update."""
    if world == 1:
        return
    import torch.distributed as dist

    gates = [m.gate for m in model.moe_layers()]
    if not gates:
        return
    flat = torch.cat([g.load_E for g in gates])
    dist.all_reduce(flat)
    for g, load in zip(gates, flat.split([g.load_E.numel() for g in gates])):
        g.load_E.copy_(load)


def all_reduce_sum(values: list[float], world: int) -> list[float]:
    """Element-wise sum of `values` over the group (the values themselves with one worker)."""
    if world == 1:
        return values
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_mean(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t)}


def shutdown_group(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
