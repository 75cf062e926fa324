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
import random
import socket
from pathlib import Path

import torch
import torch.distributed as dist

# Ray's default worker ports (--min/max-worker-port): a rendezvous stays clear of them too.
RAY_WORKER_PORTS = range(10002, 20000)
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_ports() -> range:
    """The kernel's range for outgoing connections' local ports (and for bind to port 0)."""
    try:
        low, high = map(int, EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default
    return range(low, high + 1)


def rendezvous_ports() -> range:
    """Where a rendezvous port is drawn: above Ray's worker ports and below the ephemeral
    range, or above that range where the gap below is too small."""
    eph = ephemeral_ports()
    below = range(RAY_WORKER_PORTS.stop, eph.start)
    return below if len(below) >= 1000 else range(eph.stop, 65536)


def free_port(host: str = "127.0.0.1", tries: int = 64) -> int:
    """A TCP port free now on `host`, for a store that binds it later (seconds later, once its
    process has imported torch). Not a port 0 pick: that comes from the ephemeral range, where
    any outgoing connection made meanwhile may take it as its local port (CI saw `Address
    already in use`). Drawn at random outside that range instead, so only another listener
    that picks the same port can collide. Falls back to port 0 where no such range is left."""
    ports = rendezvous_ports()
    for port in random.Random().sample(ports, min(tries, len(ports))):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
