"""The broadcast transport: flat buckets, and a real sync over a standalone gloo group."""

import os
import queue
import time
import traceback
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from sync_helpers import F16, F32, names, whole_fp

from rayrlhf.cluster.rendezvous import free_port
from rayrlhf.weight_sync.broadcast import (
    GroupAddress,
    flatten_bucket,
    new_group,
    receive_broadcast,
    receive_digest,
    send_broadcast,
    unflatten_bucket,
)
from rayrlhf.weight_sync.records import Fingerprint, ParamMeta, plan_buckets
from rayrlhf.weight_sync.trainer_end import WeightSender


def test_flatten_unflatten_round_trip():
    g = torch.Generator().manual_seed(1)
    named = [
        ("a", torch.randn(2, 3, generator=g)),
        ("b", torch.randn(4, generator=g)),
        ("c", torch.randn(1, 2, 2, generator=g)),
    ]
    metas = [ParamMeta(n, tuple(t.shape), t.dtype) for n, t in named]
    flat = flatten_bucket([t for _, t in named])
    assert flat.dim() == 1 and flat.numel() == 6 + 4 + 4
    back = unflatten_bucket(flat, metas)
    assert [n for n, _ in back] == ["a", "b", "c"]
    for (_, want), (_, got) in zip(named, back):
        assert got.shape == want.shape and torch.equal(got, want)


# ---- real broadcast over a standalone gloo group, 3 processes ------------------------------------

WORLD = 3
TIMEOUT_S = 60


def _bucket_tensors(plan, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [
        [(m.name, torch.randn(m.shape, generator=g).to(m.dtype)) for m in metas] for metas in plan
    ]


def _raw(named):
    return [
        (n, str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
        for n, t in named
    ]


def _sync_worker(rank, port, default_port, plan, buckets, results):
    try:
        torch.set_num_threads(1)
        import torch.distributed as dist

        if rank == 0:
            # Trainer rank 0 already belongs to a default group (DeepSpeed's) on another port.
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{default_port}", rank=0, world_size=1
            )
        group = new_group("gloo", "127.0.0.1", port, rank, WORLD, timeout_s=TIMEOUT_S)
        cpu = torch.device("cpu")
        if rank == 0:
            fp, n = send_broadcast(group, iter(buckets), cpu, hash_bytes=True)
            # the default group is untouched and still usable
            x = torch.ones(2)
            dist.all_reduce(x)
            assert dist.get_world_size() == 1 and x.tolist() == [1.0, 1.0]
            dist.destroy_process_group()
            results.put((rank, "ok", fp.hexdigest(), n, None))
        else:
            fp = Fingerprint()
            received = [(name, t.clone()) for name, t in receive_broadcast(group, plan, cpu, fp)]
            digest = receive_digest(group, cpu)
            results.put((rank, "ok", fp.hexdigest(), digest, _raw(received)))
    except BaseException:  # report everything to the parent rather than hang it
        results.put((rank, "error", traceback.format_exc(), None, None))


def test_broadcast_sync_three_processes():
    metas = [
        ParamMeta("embed", (64, 16), F32),
        ParamMeta("norm", (16,), F32),
        ParamMeta("q", (16, 16), F32),
        ParamMeta("half", (8, 4), F16),
        ParamMeta("head", (16, 3), F32),
    ]
    plan = plan_buckets(metas, 4096)  # embed alone (4 KiB), norm+q, half (dtype), head
    assert names(plan) == [["embed"], ["norm", "q"], ["half"], ["head"]]
    buckets = _bucket_tensors(plan)
    sent = [nt for b in buckets for nt in b]
    expected = whole_fp(sent).hexdigest()

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port, default_port = free_port(), free_port()
    procs = [
        ctx.Process(
            target=_sync_worker, args=(r, port, default_port, plan, buckets, results), daemon=True
        )
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in range(WORLD):
            rank, status, a, b, c = results.get(timeout=TIMEOUT_S)
            assert status == "ok", f"rank {rank} failed:\n{a}"
            got[rank] = (a, b, c)
        for p in procs:
            p.join(timeout=TIMEOUT_S)
            assert p.exitcode == 0, f"{p.name} exit code {p.exitcode}"
    except queue.Empty:
        pytest.fail(f"broadcast sync hung: results from ranks {sorted(got)} only")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)

    sender_fp, n_buckets, _ = got[0]
    assert sender_fp == expected
    assert n_buckets == len(plan)
    for rank in (1, 2):
        received_fp, digest, raw = got[rank]
        assert digest == expected, f"rank {rank}: digest"
        assert received_fp == expected, f"rank {rank}: fingerprint of received tensors"
        assert raw == _raw(sent), f"rank {rank}: tensors not bit-identical"


class _Sender(WeightSender):
    """Trainer rank 0 of one rank: its gathered buckets are `buckets`, slowly (a model's
    gathers take time), counted to show that a failed broadcast still gathers them all."""

    def __init__(self, plan, buckets) -> None:
        self.plan, self.buckets, self.gathered = plan, buckets, 0
        self.spec = SimpleNamespace(rank=0, world_size=1)

    def _gathered_buckets(self, bucket_mb):
        for bucket in self.buckets:
            time.sleep(0.5)
            self.gathered += 1
            yield bucket


def _dying_member_worker(rank, port, plan, buckets, results):
    """Rank 2 exits after the first bucket; rank 0 must fail, and free rank 1 at once."""
    try:
        torch.set_num_threads(1)
        group = GroupAddress("127.0.0.1", port, WORLD, "gloo", TIMEOUT_S)
        cpu, start = torch.device("cpu"), time.monotonic()
        if rank == 0:
            sender = _Sender(plan, buckets)
            sender.init_weight_group(group)
            try:
                sender.broadcast_weights(1.0)
                results.put((rank, "no error", sender.gathered))
            except RuntimeError as err:
                results.put((rank, str(err), sender.gathered))
            time.sleep(2 * TIMEOUT_S)  # alive: only a closed group frees rank 1
            return
        stream = receive_broadcast(group.join(rank), plan, cpu, Fingerprint())
        next(stream)
        if rank == 2:
            os._exit(1)
        try:
            list(stream)
            results.put((rank, "no error", None))
        except RuntimeError:
            results.put((rank, "failed", time.monotonic() - start))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def test_a_member_dying_mid_sync_fails_rank_0_which_frees_the_others():
    metas = [ParamMeta(f"w{i}", (32, 32), F32) for i in range(4)]
    plan = plan_buckets(metas, 4096)  # a bucket each
    buckets = _bucket_tensors(plan)
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [
        ctx.Process(target=_dying_member_worker, args=(r, port, plan, buckets, results))
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    try:
        got = dict((r, rest) for r, *rest in (results.get(timeout=TIMEOUT_S) for _ in range(2)))
    except queue.Empty:
        pytest.fail("rank 0 or rank 1 hung after rank 2 died")
    finally:
        for p in procs:
            p.kill()
            p.join(5)
    message, gathered = got[0]
    assert "weight broadcast to the engines failed" in message, message
    assert gathered == len(plan)  # the other trainer ranks' collectives are not left waiting
    status, waited = got[1]
    assert status == "failed" and waited < TIMEOUT_S / 2, got[1]


def test_nccl_group_gets_the_time_out(monkeypatch):
    # CPU torch has no NCCL: fakes stand in for the store and the process group, recording what
    # new_group hands them. Without a time-out a dead engine mid-sync hung rank 0 until the
    # watchdog's default; gloo already had one.
    import datetime

    import torch.distributed as dist

    made = {}

    class FakeOptions:
        pass

    class FakeNCCL:
        Options = FakeOptions

        def __init__(self, store, rank, size, opts):
            made.update(store=store, rank=rank, size=size, opts=opts)

    monkeypatch.setattr(dist, "ProcessGroupNCCL", FakeNCCL, raising=False)
    monkeypatch.setattr(dist, "TCPStore", lambda *a, **k: ("store", a, k))
    new_group("nccl", "10.0.0.7", 29500, 1, 3, timeout_s=42.0)
    store, args, kwargs = made["store"]
    assert args == ("10.0.0.7", 29500, 3, False)  # rank 1 is a client of rank 0's store
    assert kwargs["timeout"] == datetime.timedelta(seconds=42)
    assert made["opts"]._timeout == datetime.timedelta(seconds=42)
