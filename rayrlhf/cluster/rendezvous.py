"""torch.distributed rendezvous stores that listen only on the address they advertise.

A `TCPStore` master binds every interface (`::`) whatever host it is given, so a ZeRO-3
group's or a sync group's rank 0 was reachable from any network the machine is on, even when
the whole job runs on loopback. Here rank 0 binds the advertised (host, port) itself and hands
the socket to the store (`master_listen_fd`): the store listens there only. The advertised host
is rank 0's node IP (reachable from the other nodes) or 127.0.0.1 on a single machine.

No Ray here: the vLLM workers and the ZeRO-3 ranks import this, and so do tests without Ray.
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist


def bound_socket_fd(host: str, port: int) -> int:
    """A TCP socket bound to (host, port), not yet listening, as a bare descriptor: the store
    that receives it owns it and closes it (a Python socket object would close it twice)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock.detach()


def tcp_store(
    host: str, port: int, rank: int, world_size: int, timeout: datetime.timedelta
) -> dist.TCPStore:
    """The group's store: rank 0 hosts it on (host, port), listening there only (`host` must
    be rank 0's own address: the master connects to it too); the others connect to it."""
    if rank != 0:
        return dist.TCPStore(host, port, world_size, False, timeout=timeout)
    fd = bound_socket_fd(host, port)
    return dist.TCPStore(host, port, world_size, True, timeout=timeout, master_listen_fd=fd)


def init_default_group(
    backend: str, host: str, port: int, rank: int, world_size: int, timeout: datetime.timedelta
) -> None:
    """`init_process_group` through a `tcp_store` instead of env:// (whose store listens on
    every interface). DeepSpeed's `init_distributed` then adopts this group. On NCCL the rank
    binds its GPU as DeepSpeed would (`device_id`, multi-rank groups only). A process that has
    a default group keeps it, as DeepSpeed does (a second role in one process reuses it)."""
    if dist.is_initialized():
        return
    store = tcp_store(host, port, rank, world_size, timeout)
    device = None
    if backend == "nccl" and world_size > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=timeout, device_id=device
    )
