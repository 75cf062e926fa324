"""Tensors, pieces and records the weight-sync tests share."""

from __future__ import annotations

import torch

from rayrlhf.weight_sync.records import (
    Fingerprint,
    ParamMeta,
    PieceRecord,
    digest,
    dtype_name,
    raw_bytes,
    split_pieces,
)

F32, F16 = torch.float32, torch.float16


def meta(name, numel, dtype=F32):
    return ParamMeta(name, (numel,), dtype)


def names(buckets):
    return [[m.name for m in b] for b in buckets]


def metas_of(tensors):
    return [ParamMeta(n, tuple(t.shape), t.dtype) for n, t in tensors]


def whole_fp(named):
    """The fingerprint of tensors sent whole."""
    fp = Fingerprint()
    for name, t in named:
        fp.update(name, t)
    return fp


def split_fp(tensors, parts):
    """The fingerprint of `tensors` as `parts` ranks send them, built from the whole tensors."""
    fp = Fingerprint()
    for name, t in tensors:
        fp.update(name, t, parts)
    return fp


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return [
        ("w1", torch.randn(4, 3, generator=g)),
        ("b1", torch.randn(3, generator=g)),
        ("h", torch.randn(5, generator=g).half()),
    ]


def mixed_tensors(seed):
    """Shapes that stress the split: fewer elements than ranks, bf16, a scalar."""
    g = torch.Generator().manual_seed(seed)
    return [
        ("w", torch.randn(5, 7, generator=g)),
        ("tiny", torch.randn(1, generator=g)),  # fewer elements than ranks: empty pieces
        ("h", torch.randn(9, generator=g).to(torch.bfloat16)),
        ("s", torch.tensor(3.5)),
    ]


def rank_pieces(tensors, parts):
    """What each of `parts` ranks would send: its ZeRO-3 piece of every tensor."""
    return [[(n, split_pieces(t, parts)[r]) for n, t in tensors] for r in range(parts)]


def records(pieces, tensors, hashed=True):
    """The `PieceRecord`s a rank keeps of the pieces it sent."""
    return [
        PieceRecord(
            name,
            dtype_name(full.dtype),
            tuple(full.shape),
            digest(raw_bytes(p)) if hashed else b"",
            raw_bytes(p).nbytes,
        )
        for (name, p), (_, full) in zip(pieces, tensors)
    ]
