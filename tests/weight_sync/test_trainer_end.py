"""`WeightSender` on fake ZeRO-3 ranks: what the ranks send arrives whole, and what they record
is what the engine hashes."""

from types import SimpleNamespace

import pytest
import torch
from sync_helpers import metas_of, mixed_tensors, split_fp

from rayrlhf.weight_sync import object_store
from rayrlhf.weight_sync.object_store import StoredPieces, add_wires, assemble, fetch
from rayrlhf.weight_sync.records import Fingerprint, piece_bounds
from rayrlhf.weight_sync.shared_memory import SharedSegment, segment_bucket, segment_offsets
from rayrlhf.weight_sync.trainer_end import WeightSender

BUCKET_MB = 100 / 2**20  # 100 bytes: every tensor of `mixed_tensors` in a bucket of its own


class FakeZero3Rank(WeightSender):
    """Rank `rank` of `world`, holding its partitions as DeepSpeed lays them out: each
    parameter's `ds_tensor` is its piece padded to ceil(numel / world), `ds_shape` the full
    shape."""

    def __init__(self, tensors: list, rank: int, world: int) -> None:
        self.module = torch.nn.Module()
        for name, t in tensors:
            flat = t.reshape(-1)
            lo, hi = piece_bounds(flat.numel(), world)[rank]
            part = torch.zeros(-(-flat.numel() // world), dtype=t.dtype)
            part[: hi - lo] = flat[lo:hi]
            p = torch.nn.Parameter(torch.empty(0, dtype=t.dtype), requires_grad=False)
            p.ds_shape, p.ds_tensor = t.shape, part
            self.module.register_parameter(name, p)
        self.spec = SimpleNamespace(rank=rank, world_size=world)


def _check(tensors, back, world, sent, arrived):
    assert sent.num_buckets == 4 and sent.num_tensors == len(tensors)
    assert sent.fingerprint == arrived.hexdigest() == split_fp(tensors, world).hexdigest()
    for (n0, t0), (n1, t1) in zip(tensors, back, strict=True):
        assert n0 == n1 and t0.dtype == t1.dtype and torch.equal(t0, t1)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_write_the_segment_an_engine_reads_back(tmp_path, world):
    tensors = mixed_tensors(world)
    ranks = [FakeZero3Rank(tensors, r, world) for r in range(world)]
    path = str(tmp_path / "segment")
    for r in ranks:
        r.open_segment(path, create=r.spec.rank == 0)
    assert ranks[0].param_metas() == metas_of(tensors)
    offsets, nbytes = segment_offsets(metas_of(tensors))
    engine = SharedSegment(path, nbytes)
    ranks[0].unlink_segment()
    for hash_bytes in (True, False):  # two syncs: bucket 0 starts a fresh record
        arrived, back = Fingerprint(hash_bytes=hash_bytes), []
        for k in range(ranks[0].num_buckets(BUCKET_MB)):
            written = [r.write_bucket_to_segment(k, BUCKET_MB, hash_bytes) for r in ranks]
            back += segment_bucket(engine, offsets, written, arrived)
        sent = ranks[0].sync_result(*[r.sent_records() for r in ranks[1:]])
        assert sent.hashed == hash_bytes
        if hash_bytes:
            _check(tensors, back, world, sent, arrived)
        else:
            assert sent.fingerprint == arrived.hexdigest() != split_fp(tensors, world).hexdigest()


@pytest.mark.parametrize("world", [1, 2])
def test_ranks_put_pieces_an_engine_joins(monkeypatch, world):
    """The object store replaced by identity: `put_bucket`'s `StoredPieces` carry the wires."""
    monkeypatch.setattr(object_store, "ray", SimpleNamespace(put=lambda x: x, get=lambda x: x))
    tensors = mixed_tensors(world)
    ranks = [FakeZero3Rank(tensors, r, world) for r in range(world)]
    arrived, back = Fingerprint(), []
    for k in range(ranks[0].num_buckets(BUCKET_MB)):
        stored = [r.put_bucket(k, BUCKET_MB) for r in ranks]
        assert all(isinstance(s, StoredPieces) for s in stored)
        wires = fetch(stored)
        add_wires(arrived, wires)
        back += assemble(wires)
    sent = ranks[0].sync_result(*[r.sent_records() for r in ranks[1:]])
    _check(tensors, back, world, sent, arrived)
