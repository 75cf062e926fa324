"""The broadcast transport, both ends: one torch.distributed group of trainer rank 0 + every
engine worker; rank 0 gathers a bucket (collective) and broadcasts it as one flat tensor, then
the digest of all it sent. gloo on CPU, NCCL on GPU: the same code.

The trainer's default group belongs to DeepSpeed and vLLM owns its workers' default group, so
the sync group is built directly from a TCPStore and a backend process group. Rank 0's store
listens on the group's address only (`cluster.rendezvous.tcp_store`), not on every interface.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from rayrlhf.cluster.rendezvous import tcp_store
from rayrlhf.weight_sync.records import Fingerprint, ParamMeta, fingerprinted


def resolve_backend(backend: str, gpus: bool) -> str:
    """'auto' -> 'nccl' when every member of the group has a GPU (`gpus`), else 'gloo'.

    Decided from where the members run, not from the caller's process: the driver that builds
    the group usually sits on a CPU-only head."""
    if backend == "auto":
        return "nccl" if gpus else "gloo"
    return backend


def nccl_options(timeout: datetime.timedelta):
    """NCCL options with a time-out: without one a dead member hangs the others until the
    watchdog's default (10 min or more) instead of failing after `timeout`."""
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return opts


def new_group(
    backend: str, host: str, port: int, rank: int, world_size: int, timeout_s: float = 300.0
) -> dist.ProcessGroup:
    """Join a standalone group; rank 0 hosts the TCPStore on `host`, which must be rank 0's own
    address (a TCPStore master connects to it too). Blocks until all ranks joined; any
    collective that waits longer than `timeout_s` fails, on gloo and on NCCL."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = tcp_store(host, port, rank, world_size, timeout)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size, nccl_options(timeout))
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    raise ValueError(f"unknown backend {backend!r}; valid: ['gloo', 'nccl']")


@dataclass(frozen=True)
class GroupAddress:
    """What every member needs to join the sync group: where it meets and how it talks."""

    host: str
    port: int
    world_size: int
    backend: str
    """'gloo' or 'nccl' (`resolve_backend`)."""
    timeout_s: float = 300.0
    """Longest wait to join, and for any one collective (`sync.group_timeout_s`)."""

    def join(self, rank: int) -> dist.ProcessGroup:
        """Join as `rank` (`new_group`); blocks until every member joined."""
        return new_group(self.backend, self.host, self.port, rank, self.world_size, self.timeout_s)


def group_device(backend: str) -> torch.device:
    """Where the group's tensors live: this process's GPU for NCCL, else the CPU."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast(group: dist.ProcessGroup, tensor: Tensor, src: int = 0) -> None:
    """In-place broadcast of `tensor` from group rank `src`, waiting for completion."""
    opts = dist.BroadcastOptions()
    opts.rootRank = src
    group.broadcast([tensor], opts).wait()


def flatten_bucket(tensors: list[Tensor]) -> Tensor:
    """One contiguous 1-D tensor holding a bucket (same dtype throughout)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_bucket(flat: Tensor, metas: list[ParamMeta]) -> list[tuple[str, Tensor]]:
    """(name, view) per parameter of `metas`, cut from a `flatten_bucket` tensor."""
    out, offset = [], 0
    for m in metas:
        out.append((m.name, flat[offset : offset + m.numel].view(m.shape)))
        offset += m.numel
    return out


def send_broadcast(
    group: dist.ProcessGroup,
    buckets: Iterable[list[tuple[str, Tensor]]],
    device: torch.device,
    hash_bytes: bool,
) -> tuple[Fingerprint, int]:
    """Sender (trainer rank 0, group rank 0): broadcast each bucket, then the digest.
    Returns the fingerprint and the number of buckets sent."""
    fp, sent = Fingerprint(hash_bytes=hash_bytes), 0
    for bucket in buckets:
        for name, t in bucket:
            fp.update(name, t)
        broadcast(group, flatten_bucket([t for _, t in bucket]).to(device), src=0)
        sent += 1
    broadcast(group, fp.digest_tensor().to(device), src=0)
    return fp, sent


def receive_broadcast(
    group: dist.ProcessGroup, plan: list[list[ParamMeta]], device: torch.device, fp: Fingerprint
) -> Iterator[tuple[str, Tensor]]:
    """Receiver: yield the plan's tensors as their buckets arrive, hashing them into `fp`."""
    for metas in plan:
        flat = torch.empty(sum(m.numel for m in metas), dtype=metas[0].dtype, device=device)
        broadcast(group, flat, src=0)
        yield from fingerprinted(unflatten_bucket(flat, metas), fp)


def receive_digest(group: dist.ProcessGroup, device: torch.device) -> str:
    """Receiver: the sender's fingerprint, broadcast after the last bucket."""
    digest = torch.empty(32, dtype=torch.uint8, device=device)
    broadcast(group, digest, src=0)
    return bytes(digest.cpu().tolist()).hex()
