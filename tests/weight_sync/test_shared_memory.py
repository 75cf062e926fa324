"""The shared-memory transport: one segment, ranks' pieces written in place, engines' views."""

import pytest
import torch
import torch.multiprocessing as mp
from sync_helpers import F16, F32, meta, metas_of, mixed_tensors, rank_pieces, records, split_fp
from sync_helpers import sample_tensors as sample

from rayrlhf.weight_sync import shared_memory
from rayrlhf.weight_sync.records import Fingerprint, ParamMeta, dtype_name, raw_bytes
from rayrlhf.weight_sync.shared_memory import (
    SEGMENT_ALIGN,
    SegmentPiece,
    SharedSegment,
    segment_bucket,
    segment_offsets,
    segment_write,
)


def test_segment_offsets_are_aligned_ordered_and_disjoint():
    metas = [meta("a", 3), meta("b", 17, F16), ParamMeta("s", (), F32), meta("c", 1000)]
    offsets, size = segment_offsets(metas)
    assert list(offsets) == ["a", "b", "s", "c"] and offsets["a"] == 0
    ends = [offsets[m.name] + m.nbytes for m in metas]
    for nxt, end in zip(metas[1:], ends):
        assert offsets[nxt.name] % SEGMENT_ALIGN == 0 and offsets[nxt.name] >= end
    assert size == ends[-1] and size < sum(m.nbytes for m in metas) + len(metas) * SEGMENT_ALIGN


def _write_rank(path, nbytes, tensors, rank, parts):
    """One trainer rank in its own process: map the segment, write its pieces."""
    metas = metas_of(tensors)
    pieces = rank_pieces(tensors, parts)[rank]
    offsets = segment_offsets(metas)[0]
    segment_write(SharedSegment(path, nbytes), offsets, pieces, metas, rank, parts)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_segment_joins_ranks_pieces_across_processes(tmp_path, parts):
    """Ranks write their ZeRO-3 pieces into one mapped file, the last from another process; an
    engine reads whole tensors back, bit for bit, and hashes what the ranks sent."""
    tensors = mixed_tensors(parts)
    metas = metas_of(tensors)
    offsets, nbytes = segment_offsets(metas)
    path = str(tmp_path / "segment")
    engine = SharedSegment(path, nbytes, create=True)
    ranks = rank_pieces(tensors, parts)
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
    written.append([SegmentPiece(n, dtype_name(t.dtype), tuple(t.shape), raw_bytes(p).nbytes)
                    for (n, p), (_, t) in zip(ranks[-1], tensors)])  # fmt: skip
    engine.unlink()  # the name goes, the mapping stays
    assert not (tmp_path / "segment").exists()
    arrived = Fingerprint()
    back = segment_bucket(engine, offsets, written, arrived)
    for (n0, t0), (n1, t1) in zip(tensors, back):
        assert n0 == n1 and t0.dtype == t1.dtype and t0.shape == t1.shape
        assert torch.equal(t0, t1)
    sent = Fingerprint.combine([records(p, tensors) for p in ranks])
    assert arrived.hexdigest() == sent.hexdigest() == split_fp(tensors, parts).hexdigest()


def test_segment_corruption_and_misplaced_writes_are_detected(tmp_path):
    tensors = sample()
    metas = metas_of(tensors)
    offsets, nbytes = segment_offsets(metas)
    segment = SharedSegment(str(tmp_path / "segment"), nbytes, create=True)
    ranks = rank_pieces(tensors, 2)
    written = [segment_write(segment, offsets, ranks[r], metas, r, 2) for r in range(2)]
    sent = Fingerprint.combine([records(p, tensors) for p in ranks]).hexdigest()

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
    monkeypatch.setattr(shared_memory, "shared_memory_free", lambda directory: 2**20)
    with pytest.raises(OSError, match=r"0\.00 GiB free.*needs 0\.01 GiB.*--shm-size"):
        SharedSegment(str(tmp_path / "segment"), 10 * 2**20, create=True)
    assert not (tmp_path / "segment").exists()
