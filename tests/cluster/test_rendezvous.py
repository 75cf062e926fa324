"""Rendezvous stores listen on the address they advertise only, and ranks still meet there.

A plain TCPStore master listens on `::` (every interface); `tcp_store`'s must not. 127.0.0.2
stands in for a node IP: a store advertised there must not be reachable on 127.0.0.1 either.
"""

from __future__ import annotations

import datetime
import queue
import socket
import traceback

import psutil
import pytest
import torch
import torch.multiprocessing as mp

from rayrlhf.cluster.rendezvous import (
    RAY_WORKER_PORTS,
    bound_socket_fd,
    ephemeral_ports,
    free_port,
    init_default_group,
    tcp_store,
)

TIMEOUT = datetime.timedelta(seconds=60)


def _listening_on(port: int) -> list[str]:
    """This process's listening sockets on `port`, as 'ip'."""
    conns = psutil.Process().net_connections(kind="inet")
    return [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port]


def _refused(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex((host, port)) != 0


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2"])
def test_store_listens_on_its_host_only(host):
    port = free_port(host)
    store = tcp_store(host, port, 0, 1, TIMEOUT)
    try:
        assert _listening_on(port) == [host]
        store.set("k", "v")
        assert store.get("k") == b"v"
        if host != "127.0.0.1":
            assert _refused("127.0.0.1", port), "reachable on an address it does not advertise"
    finally:
        del store


def test_bound_socket_fd_refuses_a_taken_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            bound_socket_fd("127.0.0.1", taken.getsockname()[1])


def _rank(rank: int, port: int, results) -> None:
    try:
        import torch.distributed as dist

        init_default_group("gloo", "127.0.0.2", port, rank, 2, TIMEOUT)
        # A second role in the process keeps the group (here rank 0 could not bind TEST-NET-3).
        init_default_group("gloo", "203.0.113.1", port, 0, 1, TIMEOUT)
        x = torch.tensor([float(rank + 1)])
        dist.all_reduce(x)
        seen = _listening_on(port)
        dist.barrier()  # rank 1 may not outlive rank 0's store before both are done
        dist.destroy_process_group()
        results.put((rank, "ok", x.item(), seen))
    except BaseException:  # report everything to the parent rather than hang it
        results.put((rank, "error", traceback.format_exc(), None))


def test_two_ranks_meet_through_the_default_group():
    port = free_port("127.0.0.2")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, results), daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in procs:
            rank, status, value, seen = results.get(timeout=120)
            assert status == "ok", f"rank {rank} failed:\n{value}"
            got[rank] = (value, seen)
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
    except queue.Empty:
        pytest.fail(f"rendezvous hung: results from ranks {sorted(got)} only")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    assert got[0][0] == got[1][0] == 3.0  # 1 + 2: the ranks summed through one group
    assert got[0][1] == ["127.0.0.2"], "rank 0's store listens beyond its address"
    assert got[1][1] == []


def test_rendezvous_ports_avoid_the_ephemeral_and_ray_worker_ranges():
    """A port picked seconds before its store binds it must not be one that an outgoing
    connection can take meanwhile (CI: a critic's store hit `Address already in use`)."""
    eph = ephemeral_ports()
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1  # drawn at random, not one fixed port
    for port in ports:
        assert port not in eph and port not in RAY_WORKER_PORTS
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # and it is free


def test_a_taken_port_is_skipped(monkeypatch):
    """Where the drawn port is in use, the next draw is taken."""
    from rayrlhf.cluster import rendezvous

    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        taken = held.getsockname()[1]
        monkeypatch.setattr(rendezvous, "rendezvous_ports", lambda: range(taken, taken + 2))
        assert free_port() == taken + 1
