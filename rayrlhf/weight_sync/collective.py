"""A torch.distributed group outside the default one: trainer rank 0 + the engine workers.

The trainer's default group belongs to DeepSpeed and vLLM owns its workers' default group, so
the sync group is built directly from a TCPStore and a backend process group. gloo on CPU, NCCL
on GPU; the calls are the same.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def resolve_backend(backend: str) -> str:
    """'auto' -> 'nccl' when CUDA is available, else 'gloo'."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def new_group(
    backend: str, host: str, port: int, rank: int, world_size: int, timeout_s: float = 300.0
) -> dist.ProcessGroup:
    """Join a standalone group; rank 0 hosts the TCPStore. Blocks until all ranks joined."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size, dist.ProcessGroupNCCL.Options())
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    raise ValueError(f"unknown backend {backend!r}; valid: ['gloo', 'nccl']")


def broadcast(group: dist.ProcessGroup, tensor: torch.Tensor, src: int = 0) -> None:
    """In-place broadcast of `tensor` from group rank `src`, waiting for completion."""
    opts = dist.BroadcastOptions()
    opts.rootRank = src
    group.broadcast([tensor], opts).wait()
