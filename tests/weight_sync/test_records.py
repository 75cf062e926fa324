"""Bucket plan, piece layout and fingerprints: what both ends of every transport agree on."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from sync_helpers import (
    F16,
    F32,
    meta,
    names,
    rank_pieces,
    records,
    sample_tensors,
    split_fp,
    whole_fp,
)

from rayrlhf.weight_sync.records import (
    Fingerprint,
    ParamMeta,
    WeightSyncError,
    check_fingerprint,
    fingerprinted,
    piece_bounds,
    plan_buckets,
)

# ---- ParamMeta / plan_buckets ------------------------------------------------------------------


def test_param_meta_sizes_by_hand():
    assert ParamMeta("w", (3, 5), F16).numel == 15
    assert ParamMeta("w", (3, 5), F16).nbytes == 30
    assert ParamMeta("w", (2, 2, 2), F32).nbytes == 32
    assert ParamMeta("w", (4,), torch.bfloat16).nbytes == 8
    assert ParamMeta("s", (), F32).nbytes == 4


def test_plan_respects_limit_keeps_order_and_isolates_oversized():
    params = [
        meta("a", 10),
        meta("b", 10),
        meta("c", 10),
        meta("big", 100),
        meta("d", 1),
        meta("e", 5),
    ]
    # 40 B each for a, b, c; big = 400 B; d = 4 B; e = 20 B. Limit 100 B.
    buckets = plan_buckets(params, 100)
    assert names(buckets) == [["a", "b"], ["c"], ["big"], ["d", "e"]]
    assert [m for b in buckets for m in b] == params  # order kept, nothing lost or duplicated
    for b in buckets:
        assert len(b) == 1 or sum(m.nbytes for m in b) <= 100


def test_plan_fills_exactly_to_the_limit():
    buckets = plan_buckets([meta("a", 10), meta("b", 15), meta("c", 1)], 100)  # 40 + 60 = 100
    assert names(buckets) == [["a", "b"], ["c"]]


def test_plan_oversized_first_parameter_is_alone():
    buckets = plan_buckets([meta("big", 1000), meta("a", 1), meta("b", 1)], 64)
    assert names(buckets) == [["big"], ["a", "b"]]


def test_plan_splits_on_dtype_change():
    params = [meta("a", 2), meta("b", 2), meta("h", 2, F16), meta("i", 2, F16), meta("c", 2)]
    buckets = plan_buckets(params, 1 << 20)  # the limit alone would allow one bucket
    assert names(buckets) == [["a", "b"], ["h", "i"], ["c"]]
    for b in buckets:
        assert len({m.dtype for m in b}) == 1


def test_plan_empty():
    assert plan_buckets([], 100) == []


@pytest.mark.parametrize("numel,parts", [(10, 2), (7, 2), (5, 4), (1, 3), (0, 2), (12, 3)])
def test_piece_bounds_tile_the_tensor_in_zero3_layout(numel, parts):
    bounds = piece_bounds(numel, parts)
    size = -(-numel // parts)
    assert len(bounds) == parts
    assert [lo for lo, _ in bounds] == [min(r * size, numel) for r in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, no overlap
    assert all(hi - lo <= size for lo, hi in bounds)


# ---- Fingerprint -------------------------------------------------------------------------------


def test_fingerprint_equal_for_equal_tensors():
    a = sample_tensors()
    b = [(n, t.clone()) for n, t in a]
    assert whole_fp(a).hexdigest() == whole_fp(b).hexdigest()
    # the same values in a non-contiguous layout hash the same
    t = a[0][1]
    assert (
        whole_fp([("w1", t.t().contiguous().t())]).hexdigest() == whole_fp([("w1", t)]).hexdigest()
    )


def test_fingerprint_changes_with_one_ulp():
    a = sample_tensors()
    w = a[0][1].clone()
    w[2, 1] = torch.nextafter(w[2, 1], torch.tensor(float("inf")))
    assert w[2, 1] != a[0][1][2, 1] and torch.allclose(w, a[0][1], rtol=1e-6, atol=0)
    b = [("w1", w)] + a[1:]
    assert whole_fp(a).hexdigest() != whole_fp(b).hexdigest()


def test_fingerprint_changes_when_elements_swap_or_a_row_is_stale():
    a = sample_tensors()
    base = whole_fp(a).hexdigest()
    swapped = a[0][1].clone()
    swapped[0, 0], swapped[1, 2] = a[0][1][1, 2], a[0][1][0, 0]  # same values, other places
    assert whole_fp([("w1", swapped)] + a[1:]).hexdigest() != base
    stale = a[0][1].clone()
    stale[1] = 0.0  # a shard that never arrived
    assert whole_fp([("w1", stale)] + a[1:]).hexdigest() != base


def test_fingerprint_changes_with_names_order_dtype_and_shape():
    a = sample_tensors()
    base = whole_fp(a).hexdigest()
    renamed = [("w2", a[0][1])] + a[1:]
    reordered = [a[1], a[0], a[2]]
    assert whole_fp(renamed).hexdigest() != base
    assert whole_fp(reordered).hexdigest() != base
    t = a[0][1]
    same_bytes_other_dtype = t.view(torch.int32)
    assert whole_fp([("w", t)]).hexdigest() != whole_fp([("w", same_bytes_other_dtype)]).hexdigest()
    assert whole_fp([("w", t)]).hexdigest() != whole_fp([("w", t.reshape(3, 4))]).hexdigest()


def test_fingerprint_counts_and_digest_tensor():
    fp = whole_fp(sample_tensors())
    assert fp.num_tensors == 3
    assert fp.num_bytes == 12 * 4 + 3 * 4 + 5 * 2
    d = fp.digest_tensor()
    assert d.dtype == torch.uint8 and d.shape == (32,)
    assert bytes(d.tolist()).hex() == fp.hexdigest()


def test_fingerprint_scalar_parameter():
    fp = whole_fp([("scale", torch.tensor(2.0))])
    assert fp.num_tensors == 1 and fp.num_bytes == 4
    assert fp.hexdigest() != whole_fp([("scale", torch.tensor(3.0))]).hexdigest()


def test_fingerprinted_passes_through_and_hashes():
    a = sample_tensors()
    fp = Fingerprint()
    out = list(fingerprinted(iter(a), fp))
    assert [n for n, _ in out] == [n for n, _ in a]
    assert all(x is y for (_, x), (_, y) in zip(out, a))
    assert fp.hexdigest() == whole_fp(a).hexdigest()


def test_check_fingerprint():
    a = sample_tensors()
    expected = whole_fp(a).hexdigest()
    assert check_fingerprint(expected, whole_fp(a), "engine 0") == expected
    bad = [a[0], ("b1", a[1][1] + 1)] + a[2:]
    with pytest.raises(WeightSyncError) as err:
        check_fingerprint(expected, whole_fp(bad), "engine 3 worker 1")
    msg = str(err.value)
    assert "engine 3 worker 1" in msg
    assert "mismatch" in msg
    assert expected[:16] in msg
    assert "3 tensors" in msg


@pytest.mark.parametrize("threads", [1, 4])
def test_fingerprint_hashed_on_a_thread_pool_equals_inline(threads):
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


# ---- what the ranks sent, combined -------------------------------------------------------------


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_combined_records_equal_the_split_of_the_whole(parts):
    tensors = sample_tensors()
    sent = Fingerprint.combine([records(p, tensors) for p in rank_pieces(tensors, parts)])
    assert sent.hexdigest() == split_fp(tensors, parts).hexdigest()
    assert sent.num_tensors == 3
    assert sent.num_bytes == sum(t.numel() * t.element_size() for _, t in tensors)
    if parts == 1:  # one piece is the whole tensor
        assert sent.hexdigest() == whole_fp(tensors).hexdigest()
    else:  # the digest names the split: the same weights sent another way differ
        assert sent.hexdigest() != whole_fp(tensors).hexdigest()


def test_combine_skips_ranks_that_sent_nothing_and_catches_a_changed_piece():
    tensors = [("w", torch.arange(10.0)), ("b", torch.ones(3))]
    gathered = Fingerprint.combine([records(tensors, tensors), []])  # rank 0 sent it all
    assert gathered.hexdigest() == whole_fp(tensors).hexdigest()
    ranks = rank_pieces(tensors, 2)
    ranks[1][0] = ("w", ranks[1][0][1] + 1e-3)
    changed = Fingerprint.combine([records(p, tensors) for p in ranks])
    assert changed.hexdigest() != split_fp(tensors, 2).hexdigest()
    swapped = Fingerprint.combine([records(p, tensors) for p in rank_pieces(tensors, 2)[::-1]])
    assert swapped.hexdigest() != split_fp(tensors, 2).hexdigest()  # pieces out of rank order


def test_combine_raises_when_ranks_disagree_on_a_tensor():
    tensors = [("w", torch.zeros(4))]
    r0 = records(rank_pieces(tensors, 2)[0], tensors)
    r1 = [r0[0]._replace(name="v")]
    with pytest.raises(WeightSyncError, match="different tensors"):
        Fingerprint.combine([r0, r1])


@pytest.mark.parametrize("parts", [1, 3])
def test_fingerprint_without_hashing_never_reads_the_bytes(parts):
    # A meta tensor has no bytes: reading them (a host copy, for a GPU tensor) raises. Without
    # hashing the records still hold names, dtypes, shapes and piece sizes, as the bytes' would.
    ghost = torch.empty(5, 4, dtype=torch.bfloat16, device="meta")
    fp = Fingerprint(hash_bytes=False)
    fp.update("w", ghost, parts)
    real = Fingerprint(hash_bytes=False)
    real.update("w", torch.zeros(5, 4, dtype=torch.bfloat16), parts)
    assert fp.hexdigest() == real.hexdigest()
    assert fp.num_bytes == 40 and fp.num_tensors == 1
    other = Fingerprint(hash_bytes=False)
    other.update("w", torch.zeros(4, 5, dtype=torch.bfloat16), parts)
    assert other.hexdigest() != fp.hexdigest()  # the shape is still checked
