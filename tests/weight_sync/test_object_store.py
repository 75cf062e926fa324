"""The object-store transport's records: wires, their fingerprint, assembling the pieces."""

import pickle

import numpy as np
import pytest
import torch
from sync_helpers import mixed_tensors, rank_pieces, records, sample_tensors, split_fp

from rayrlhf.weight_sync.object_store import WirePiece, add_wires, assemble, to_wire
from rayrlhf.weight_sync.records import Fingerprint


def _wires(tensors, parts):
    shapes = [tuple(t.shape) for _, t in tensors]
    return [to_wire(p, shapes) for p in rank_pieces(tensors, parts)]


def test_wire_format_round_trips_bytes_dtypes_and_shapes():
    bucket = [
        ("w", torch.randn(3, 4)),
        ("b16", torch.randn(5).to(torch.bfloat16)),  # numpy has no bfloat16: sent as raw bytes
        ("scalar", torch.tensor(2.5)),
    ]
    wire = to_wire(bucket)
    assert all(isinstance(p, WirePiece) and p.raw.dtype == np.uint8 for p in wire)
    back = assemble([wire])
    sent, got = Fingerprint(), Fingerprint()
    for (n0, t0), (n1, t1) in zip(bucket, back):
        assert n0 == n1 and t0.dtype == t1.dtype and t0.shape == t1.shape
        assert torch.equal(t0, t1)
        sent.update(n0, t0)
        got.update(n1, t1)
    assert sent.hexdigest() == got.hexdigest()


def test_wire_bytes_travel_out_of_band():
    """Ray pickles with protocol 5: each piece's bytes leave as a buffer of their own, not
    copied into the pickle, and come back as the same bytes in a `WirePiece`."""
    wire = to_wire([("w", torch.randn(256, 64)), ("b", torch.randn(64))])
    buffers = []
    data = pickle.dumps(wire, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 2 and len(data) < 1024
    back = pickle.loads(data, buffers=buffers)
    assert all(isinstance(p, WirePiece) for p in back)
    assert [(p.name, p.dtype, p.shape) for p in back] == [(p.name, p.dtype, p.shape) for p in wire]
    assert all(np.array_equal(a.raw, b.raw) for a, b in zip(back, wire))


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_pieces_fingerprint_and_assemble_equal_the_whole(parts):
    tensors = mixed_tensors(parts)
    ranks = rank_pieces(tensors, parts)
    for (_, t), *pieces in zip(tensors, *ranks):  # the pieces tile each tensor, in order
        assert torch.equal(torch.cat([p for _, p in pieces]), t.reshape(-1))
    sent = Fingerprint.combine([records(p, tensors) for p in ranks])  # what the trainer says
    wires = _wires(tensors, parts)
    arrived = Fingerprint()  # what the engine hashes
    add_wires(arrived, wires)
    assert sent.hexdigest() == split_fp(tensors, parts).hexdigest() == arrived.hexdigest()
    assert (sent.num_bytes, sent.num_tensors) == (arrived.num_bytes, arrived.num_tensors)
    back = assemble(wires)
    for (n0, t0), (n1, t1) in zip(tensors, back):
        assert n0 == n1 and t0.dtype == t1.dtype and torch.equal(t0, t1)


def test_fingerprint_without_hashing_keeps_the_records():
    """`hash_bytes` off: the same for any bytes, different for any other tensor list."""

    def unhashed(tensors, parts=2):
        fp = Fingerprint(hash_bytes=False)  # what the engine computes from the wires
        add_wires(fp, _wires(tensors, parts))
        return fp.hexdigest()

    a = sample_tensors()
    base = unhashed(a)
    trainer = Fingerprint.combine([records(p, a, hashed=False) for p in rank_pieces(a, 2)])
    assert trainer.hexdigest() == base  # trainer and engine agree
    assert unhashed([(n, t + 1) for n, t in a]) == base  # bytes are not covered
    assert base != split_fp(a, 2).hexdigest()
    assert unhashed(a[:2]) != base  # a tensor missing
    assert unhashed([a[1], a[0], a[2]]) != base  # out of order
    assert unhashed([("w1", a[0][1].reshape(3, 4))] + a[1:]) != base  # another shape
    assert unhashed(a, parts=3) != base  # another split
