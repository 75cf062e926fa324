import queue
import traceback

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from rayrlhf.cluster.placement import free_port
from rayrlhf.weight_sync import collective
from rayrlhf.weight_sync.records import (
    SEGMENT_ALIGN,
    Fingerprint,
    ParamMeta,
    SharedSegment,
    WeightSyncError,
    assemble,
    check_fingerprint,
    digest,
    dtype_name,
    fingerprinted,
    flatten_bucket,
    piece_bounds,
    plan_buckets,
    raw_bytes,
    receive_broadcast,
    receive_digest,
    segment_bucket,
    segment_offsets,
    segment_write,
    send_broadcast,
    split_pieces,
    to_wire,
    unflatten_bucket,
)

F32, F16 = torch.float32, torch.float16


def _m(name, numel, dtype=F32):
    return ParamMeta(name, (numel,), dtype)


def _names(buckets):
    return [[m.name for m in b] for b in buckets]


# ---- ParamMeta / plan_buckets ------------------------------------------------------------------


def test_param_meta_sizes_by_hand():
    assert ParamMeta("w", (3, 5), F16).numel == 15
    assert ParamMeta("w", (3, 5), F16).nbytes == 30
    assert ParamMeta("w", (2, 2, 2), F32).nbytes == 32
    assert ParamMeta("w", (4,), torch.bfloat16).nbytes == 8
    assert ParamMeta("s", (), F32).nbytes == 4


def test_plan_respects_limit_keeps_order_and_isolates_oversized():
    params = [_m("a", 10), _m("b", 10), _m("c", 10), _m("big", 100), _m("d", 1), _m("e", 5)]
    # 40 B each for a, b, c; big = 400 B; d = 4 B; e = 20 B. Limit 100 B.
    buckets = plan_buckets(params, 100)
    assert _names(buckets) == [["a", "b"], ["c"], ["big"], ["d", "e"]]
    assert [m for b in buckets for m in b] == params  # order kept, nothing lost or duplicated
    for b in buckets:
        assert len(b) == 1 or sum(m.nbytes for m in b) <= 100


def test_plan_fills_exactly_to_the_limit():
    buckets = plan_buckets([_m("a", 10), _m("b", 15), _m("c", 1)], 100)  # 40 + 60 = 100
    assert _names(buckets) == [["a", "b"], ["c"]]


def test_plan_oversized_first_parameter_is_alone():
    buckets = plan_buckets([_m("big", 1000), _m("a", 1), _m("b", 1)], 64)
    assert _names(buckets) == [["big"], ["a", "b"]]


def test_plan_splits_on_dtype_change():
    params = [_m("a", 2), _m("b", 2), _m("h", 2, F16), _m("i", 2, F16), _m("c", 2)]
    buckets = plan_buckets(params, 1 << 20)  # the limit alone would allow one bucket
    assert _names(buckets) == [["a", "b"], ["h", "i"], ["c"]]
    for b in buckets:
        assert len({m.dtype for m in b}) == 1


def test_plan_empty():
    assert plan_buckets([], 100) == []


# ---- Fingerprint -------------------------------------------------------------------------------


def _fp(named):
    fp = Fingerprint()
    for name, t in named:
        fp.update(name, t)
    return fp


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [
        ("w1", torch.randn(4, 3, generator=g)),
        ("b1", torch.randn(3, generator=g)),
        ("h", torch.randn(5, generator=g).half()),
    ]


def test_fingerprint_equal_for_equal_tensors():
    a = _tensors()
    b = [(n, t.clone()) for n, t in a]
    assert _fp(a).hexdigest() == _fp(b).hexdigest()
    # the same values in a non-contiguous layout hash the same
    t = a[0][1]
    assert _fp([("w1", t.t().contiguous().t())]).hexdigest() == _fp([("w1", t)]).hexdigest()


def test_fingerprint_changes_with_one_ulp():
    a = _tensors()
    w = a[0][1].clone()
    w[2, 1] = torch.nextafter(w[2, 1], torch.tensor(float("inf")))
    assert w[2, 1] != a[0][1][2, 1] and torch.allclose(w, a[0][1], rtol=1e-6, atol=0)
    b = [("w1", w)] + a[1:]
    assert _fp(a).hexdigest() != _fp(b).hexdigest()


def test_fingerprint_changes_when_elements_swap_or_a_row_is_stale():
    a = _tensors()
    base = _fp(a).hexdigest()
    swapped = a[0][1].clone()
    swapped[0, 0], swapped[1, 2] = a[0][1][1, 2], a[0][1][0, 0]  # same values, other places
    assert _fp([("w1", swapped)] + a[1:]).hexdigest() != base
    stale = a[0][1].clone()
    stale[1] = 0.0  # a shard that never arrived
    assert _fp([("w1", stale)] + a[1:]).hexdigest() != base


def test_fingerprint_changes_with_names_order_dtype_and_shape():
    a = _tensors()
    base = _fp(a).hexdigest()
    renamed = [("w2", a[0][1])] + a[1:]
    reordered = [a[1], a[0], a[2]]
    assert _fp(renamed).hexdigest() != base
    assert _fp(reordered).hexdigest() != base
    t = a[0][1]
    same_bytes_other_dtype = t.view(torch.int32)
    assert _fp([("w", t)]).hexdigest() != _fp([("w", same_bytes_other_dtype)]).hexdigest()
    assert _fp([("w", t)]).hexdigest() != _fp([("w", t.reshape(3, 4))]).hexdigest()


def test_fingerprint_counts_and_digest_tensor():
    a = _tensors()
    fp = _fp(a)
    assert fp.num_tensors == 3
    assert fp.num_bytes == 12 * 4 + 3 * 4 + 5 * 2
    d = fp.digest_tensor()
    assert d.dtype == torch.uint8 and d.shape == (32,)
    assert bytes(d.tolist()).hex() == fp.hexdigest()


def test_fingerprint_scalar_parameter():
    fp = _fp([("scale", torch.tensor(2.0))])
    assert fp.num_tensors == 1 and fp.num_bytes == 4
    assert fp.hexdigest() != _fp([("scale", torch.tensor(3.0))]).hexdigest()


def test_fingerprinted_passes_through_and_hashes():
    a = _tensors()
    fp = Fingerprint()
    out = list(fingerprinted(iter(a), fp))
    assert [n for n, _ in out] == [n for n, _ in a]
    assert all(x is y for (_, x), (_, y) in zip(out, a))
    assert fp.hexdigest() == _fp(a).hexdigest()


def test_check_fingerprint():
    a = _tensors()
    expected = _fp(a).hexdigest()
    assert check_fingerprint(expected, _fp(a), "engine 0") == expected
    bad = [a[0], ("b1", a[1][1] + 1)] + a[2:]
    with pytest.raises(WeightSyncError) as err:
        check_fingerprint(expected, _fp(bad), "engine 3 worker 1")
    msg = str(err.value)
    assert "engine 3 worker 1" in msg
    assert "mismatch" in msg
    assert expected[:16] in msg
    assert "3 tensors" in msg


# ---- flatten / unflatten -----------------------------------------------------------------------


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
        group = collective.new_group("gloo", "127.0.0.1", port, rank, WORLD, timeout_s=TIMEOUT_S)
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
    assert _names(plan) == [["embed"], ["norm", "q"], ["half"], ["head"]]
    buckets = _bucket_tensors(plan)
    sent = [nt for b in buckets for nt in b]
    expected = _fp(sent).hexdigest()

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


def test_wire_format_round_trips_bytes_dtypes_and_shapes():
    bucket = [
        ("w", torch.randn(3, 4)),
        ("b16", torch.randn(5).to(torch.bfloat16)),  # numpy has no bfloat16: sent as raw bytes
        ("scalar", torch.tensor(2.5)),
    ]
    wire = to_wire(bucket)
    assert all(raw.dtype == np.uint8 for *_, raw in wire)
    back = assemble([wire])
    sent, got = Fingerprint(), Fingerprint()
    for (n0, t0), (n1, t1) in zip(bucket, back):
        assert n0 == n1 and t0.dtype == t1.dtype and t0.shape == t1.shape
        assert torch.equal(t0, t1)
        sent.update(n0, t0)
        got.update(n1, t1)
    assert sent.hexdigest() == got.hexdigest()


# ---- sharded object-store sync: pieces, their fingerprint, assemble -----------------------------


@pytest.mark.parametrize("numel,parts", [(10, 2), (7, 2), (5, 4), (1, 3), (0, 2), (12, 3)])
def test_piece_bounds_tile_the_tensor_in_zero3_layout(numel, parts):
    bounds = piece_bounds(numel, parts)
    size = -(-numel // parts)
    assert len(bounds) == parts
    assert [lo for lo, _ in bounds] == [min(r * size, numel) for r in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, no overlap
    assert all(hi - lo <= size for lo, hi in bounds)


def _pieces(tensors, parts):
    """What each of `parts` ranks would send: its ZeRO-3 piece of every tensor."""
    return [[(n, split_pieces(t, parts)[r]) for n, t in tensors] for r in range(parts)]


def _records(pieces, tensors):
    return [
        (name, dtype_name(full.dtype), tuple(full.shape), digest(raw_bytes(p)), raw_bytes(p).nbytes)
        for (name, p), (_, full) in zip(pieces, tensors)
    ]


def _split_fp(tensors, parts):
    """The fingerprint of `tensors` as `parts` ranks send them, built from the whole tensors."""
    fp = Fingerprint()
    for name, t in tensors:
        fp.update(name, t, parts)
    return fp


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_pieces_fingerprint_and_assemble_equal_the_whole(parts):
    g = torch.Generator().manual_seed(parts)
    tensors = [
        ("w", torch.randn(5, 7, generator=g)),
        ("tiny", torch.randn(1, generator=g)),  # fewer elements than ranks: empty pieces
        ("h", torch.randn(9, generator=g).to(torch.bfloat16)),
    ]
    ranks = _pieces(tensors, parts)
    for (_, t), *pieces in zip(tensors, *ranks):  # the pieces tile each tensor, in order
        assert torch.equal(torch.cat([p for _, p in pieces]), t.reshape(-1))
    sent = Fingerprint.combine([_records(p, tensors) for p in ranks])  # what the trainer says
    expected = _split_fp(tensors, parts)  # from the whole tensors
    shapes = [tuple(t.shape) for _, t in tensors]
    wires = [to_wire(p, shapes) for p in ranks]
    arrived = Fingerprint()  # what the engine hashes
    arrived.add_wires(wires)
    assert sent.hexdigest() == expected.hexdigest() == arrived.hexdigest()
    assert (
        sent.num_bytes == arrived.num_bytes == sum(t.numel() * t.element_size() for _, t in tensors)
    )
    assert sent.num_tensors == arrived.num_tensors == 3
    if parts == 1:  # one piece is the whole tensor
        assert sent.hexdigest() == _fp(tensors).hexdigest()
    else:  # the digest names the split: the same weights sent another way differ
        assert sent.hexdigest() != _fp(tensors).hexdigest()
    back = assemble(wires)
    for (n0, t0), (n1, t1) in zip(tensors, back):
        assert n0 == n1 and t0.dtype == t1.dtype and torch.equal(t0, t1)


def test_combine_skips_ranks_that_sent_nothing_and_catches_a_changed_piece():
    tensors = [("w", torch.arange(10.0)), ("b", torch.ones(3))]
    gathered = Fingerprint.combine([_records(tensors, tensors), []])  # rank 0 sent it all
    assert gathered.hexdigest() == _fp(tensors).hexdigest()
    ranks = _pieces(tensors, 2)
    ranks[1][0] = ("w", ranks[1][0][1] + 1e-3)
    changed = Fingerprint.combine([_records(p, tensors) for p in ranks])
    assert changed.hexdigest() != _split_fp(tensors, 2).hexdigest()
    swapped = Fingerprint.combine([_records(p, tensors) for p in _pieces(tensors, 2)[::-1]])
    assert swapped.hexdigest() != _split_fp(tensors, 2).hexdigest()  # pieces out of rank order


def test_fingerprint_without_hashing_keeps_the_records():
    """`hash_bytes` off: the same for any bytes, different for any other tensor list."""

    def unhashed(tensors, parts=2, records=False):
        if records:  # what the trainer ranks record when not hashing
            ranks = _pieces(tensors, parts)
            return Fingerprint.combine(
                [[(*r[:3], b"", r[4]) for r in _records(p, tensors)] for p in ranks]
            ).hexdigest()
        fp = Fingerprint(hash_bytes=False)  # what the engine computes from the wires
        fp.add_wires(
            [to_wire(p, [tuple(t.shape) for _, t in tensors]) for p in _pieces(tensors, parts)]
        )
        return fp.hexdigest()

    a = _tensors()
    base = unhashed(a)
    assert unhashed(a, records=True) == base  # trainer and engine agree
    assert unhashed([(n, t + 1) for n, t in a]) == base  # bytes are not covered
    assert base != _split_fp(a, 2).hexdigest()
    assert unhashed(a[:2]) != base  # a tensor missing
    assert unhashed([a[1], a[0], a[2]]) != base  # out of order
    assert unhashed([("w1", a[0][1].reshape(3, 4))] + a[1:]) != base  # another shape
    assert unhashed(a, parts=3) != base  # another split


def test_combine_raises_when_ranks_disagree_on_a_tensor():
    tensors = [("w", torch.zeros(4))]
    r0 = _records(_pieces(tensors, 2)[0], tensors)
    r1 = [("v", *r0[0][1:])]
    with pytest.raises(WeightSyncError, match="different tensors"):
        Fingerprint.combine([r0, r1])


@pytest.mark.parametrize("threads", [1, 4])
def test_fingerprint_hashed_on_a_thread_pool_equals_inline(threads):
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(3)
    tensors = [(f"t{i}", torch.randn(1000 + 997 * i, generator=g)) for i in range(20)]
    inline = Fingerprint()
    with ThreadPoolExecutor(threads) as pool:
        background = Fingerprint(pool)
        for name, t in tensors:
            inline.update(name, t)
            background.update(name, t)
        assert background.hexdigest() == inline.hexdigest()
        assert (background.num_bytes, background.num_tensors) == (inline.num_bytes, 20)
        background.update("late", torch.ones(3))  # records after a digest still count, in order
        inline.update("late", torch.ones(3))
        assert torch.equal(background.digest_tensor(), inline.digest_tensor())


# ---- shared-memory sync: the segment ----------------------------------------------------------


def test_segment_offsets_are_aligned_ordered_and_disjoint():
    metas = [_m("a", 3), _m("b", 17, F16), ParamMeta("s", (), F32), _m("c", 1000)]
    offsets, size = segment_offsets(metas)
    assert list(offsets) == ["a", "b", "s", "c"] and offsets["a"] == 0
    ends = [offsets[m.name] + m.nbytes for m in metas]
    for nxt, end in zip(metas[1:], ends):
        assert offsets[nxt.name] % SEGMENT_ALIGN == 0 and offsets[nxt.name] >= end
    assert size == ends[-1] and size < sum(m.nbytes for m in metas) + len(metas) * SEGMENT_ALIGN


def _write_rank(path, nbytes, tensors, rank, parts):
    """One trainer rank in its own process: map the segment, write its pieces."""
    metas = [ParamMeta(n, tuple(t.shape), t.dtype) for n, t in tensors]
    pieces = _pieces(tensors, parts)[rank]
    offsets = segment_offsets(metas)[0]
    segment_write(SharedSegment(path, nbytes), offsets, pieces, metas, rank, parts)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_segment_joins_ranks_pieces_across_processes(tmp_path, parts):
    """Ranks write their ZeRO-3 pieces into one mapped file, the last from another process; an
    engine reads whole tensors back, bit for bit, and hashes what the ranks sent."""
    g = torch.Generator().manual_seed(parts)
    tensors = [
        ("w", torch.randn(5, 7, generator=g)),
        ("tiny", torch.randn(1, generator=g)),  # fewer elements than ranks: empty pieces
        ("h", torch.randn(9, generator=g).to(torch.bfloat16)),
        ("s", torch.tensor(3.5)),
    ]
    metas = [ParamMeta(n, tuple(t.shape), t.dtype) for n, t in tensors]
    offsets, nbytes = segment_offsets(metas)
    path = str(tmp_path / "segment")
    engine = SharedSegment(path, nbytes, create=True)
    ranks = _pieces(tensors, parts)
    written = [
        segment_write(SharedSegment(path, nbytes), offsets, ranks[r], metas, r, parts)
        for r in range(parts - 1)
    ]
    child = mp.get_context("spawn").Process(
        target=_write_rank, args=(path, nbytes, tensors, parts - 1, parts)
    )
    child.start()
    child.join(60)
    assert child.exitcode == 0
    written.append([(n, dtype_name(t.dtype), tuple(t.shape), raw_bytes(p).nbytes)
                    for (n, p), (_, t) in zip(ranks[-1], tensors)])  # fmt: skip
    engine.unlink()  # the name goes, the mapping stays
    assert not (tmp_path / "segment").exists()
    arrived = Fingerprint()
    back = segment_bucket(engine, offsets, written, arrived)
    for (n0, t0), (n1, t1) in zip(tensors, back):
        assert n0 == n1 and t0.dtype == t1.dtype and t0.shape == t1.shape
        assert torch.equal(t0, t1)
    sent = Fingerprint.combine([_records(p, tensors) for p in ranks])
    assert arrived.hexdigest() == sent.hexdigest() == _split_fp(tensors, parts).hexdigest()


def test_segment_corruption_and_misplaced_writes_are_detected(tmp_path):
    tensors = _tensors()
    metas = [ParamMeta(n, tuple(t.shape), t.dtype) for n, t in tensors]
    offsets, nbytes = segment_offsets(metas)
    segment = SharedSegment(str(tmp_path / "segment"), nbytes, create=True)
    ranks = _pieces(tensors, 2)
    written = [segment_write(segment, offsets, ranks[r], metas, r, 2) for r in range(2)]
    sent = Fingerprint.combine([_records(p, tensors) for p in ranks]).hexdigest()

    def arrived():
        fp = Fingerprint()
        segment_bucket(segment, offsets, written, fp)
        return fp.hexdigest()

    assert arrived() == sent
    segment.buf[offsets["b1"] + 1] ^= 0x01  # one bit of one element
    assert arrived() != sent
    segment.buf[offsets["b1"] + 1] ^= 0x01
    assert arrived() == sent
    # Rank 1 writing where rank 0's piece goes (an offset bug) leaves a tensor half stale.
    segment_write(segment, offsets, ranks[1], metas, 0, 2)
    assert arrived() != sent


def test_segment_refuses_to_create_beyond_free_space(tmp_path, monkeypatch):
    from rayrlhf.weight_sync import records

    monkeypatch.setattr(records, "shared_memory_free", lambda directory: 2**20)
    with pytest.raises(OSError, match=r"0\.00 GiB free.*needs 0\.01 GiB.*--shm-size"):
        SharedSegment(str(tmp_path / "segment"), 10 * 2**20, create=True)
    assert not (tmp_path / "segment").exists()
