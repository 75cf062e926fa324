"""The shared-memory transport, both ends: one node only; the default there.

One tmpfs segment (`SharedSegment`), mapped by every trainer rank and engine of the node, holds
the whole model. Each rank copies its ZeRO-3 partition of a bucket straight to where those
elements of the joined tensor live (`segment_write`); the engines load views of the segment
(`segment_bucket`). No join, no object store, one copy in all.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from rayrlhf.weight_sync.records import (
    Fingerprint,
    ParamMeta,
    dtype_name,
    piece_bounds,
    raw_bytes,
    tensor_from_raw,
)

SEGMENT_ALIGN = 64
"""Byte alignment of each tensor in a `SharedSegment`: a cache line, for the copies' vector
loads and stores."""


class SegmentPiece(NamedTuple):
    """What one rank wrote of one tensor into a `SharedSegment`."""

    name: str
    dtype: str
    """`dtype_name` of the tensor."""
    shape: tuple[int, ...]
    """The full tensor's shape, not the piece's."""
    nbytes: int
    """Bytes of the rank's piece."""


def segment_offsets(metas: Iterable[ParamMeta]) -> tuple[dict[str, int], int]:
    """Where each tensor starts in a segment that holds them all whole, in order, each at a
    `SEGMENT_ALIGN` boundary; and the segment's size. Every bucket plan fits, so one segment
    serves any `bucket_mb`, and no sync ever writes where an engine is still reading."""
    offsets, size = {}, 0
    for m in metas:
        size = -(-size // SEGMENT_ALIGN) * SEGMENT_ALIGN
        offsets[m.name] = size
        size += m.nbytes
    return offsets, size


def new_segment_path() -> str:
    """A fresh name in /dev/shm for one run's segment."""
    return os.path.join("/dev/shm", f"rayrlhf-weights-{uuid.uuid4().hex[:16]}")


def shared_memory_free(directory: str = "/dev/shm") -> int:
    """Bytes free on the file system that holds `directory`."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


class SharedSegment:
    """A tmpfs file mapped shared into every trainer rank and engine on one node: the
    `shared_memory` transport's buffer.

    The creator checks the file system's free space first, because tmpfs fails a write to a
    full device with SIGBUS, not an error. Once every process has mapped it, the file is
    unlinked (`unlink`): the memory lives as long as some process maps it, so a crashed run
    leaves nothing behind in /dev/shm.
    """

    def __init__(self, path: str, nbytes: int, create: bool = False) -> None:
        if create:
            free = shared_memory_free(os.path.dirname(path))
            if free < nbytes:
                raise OSError(
                    f"{os.path.dirname(path)} has {free / 2**30:.2f} GiB free; the weight-sync "
                    f"segment needs {nbytes / 2**30:.2f} GiB. Give the node more shared memory "
                    "(docker --shm-size, a Kubernetes emptyDir with medium Memory), or set "
                    "sync.transport=object_store"
                )
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, nbytes)
            finally:
                os.close(fd)
        self.path = path
        self.buf = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)

    def write(self, offset: int, raw: np.ndarray) -> None:
        """Copy raw bytes in at `offset`."""
        self.buf[offset : offset + raw.nbytes].copy_(torch.from_numpy(raw))

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        """A uint8 view of `nbytes` at `offset`, no copy."""
        return self.buf[offset : offset + nbytes].numpy()

    def unlink(self) -> None:
        """Remove the file's name; the mappings stay valid."""
        os.unlink(self.path)


def segment_write(
    segment: SharedSegment,
    offsets: dict[str, int],
    pieces: list[tuple[str, Tensor]],
    metas: list[ParamMeta],
    rank: int,
    world: int,
) -> list[SegmentPiece]:
    """Trainer end, rank `rank` of `world`: copy its ZeRO-3 piece of each tensor (host tensors,
    `metas` order) to where those elements of the whole tensor live in `segment`."""
    out = []
    for (name, t), m in zip(pieces, metas, strict=True):
        raw = raw_bytes(t)
        lo = piece_bounds(m.numel, world)[rank][0]
        segment.write(offsets[name] + lo * m.itemsize, raw)
        out.append(SegmentPiece(name, dtype_name(m.dtype), m.shape, raw.nbytes))
    return out


def segment_bucket(
    segment: SharedSegment,
    offsets: dict[str, int],
    ranks: list[list[SegmentPiece]],
    fp: Fingerprint,
) -> list[tuple[str, Tensor]]:
    """Engine end: the full tensors of one bucket the ranks wrote into `segment` (their
    `segment_write` results, in rank order), as views: no copy. Each rank's piece is hashed into
    `fp`, read where the engine will load it from, so the fingerprint vouches for the offsets
    too."""
    out = []
    for pieces in zip(*ranks, strict=True):
        first = pieces[0]
        start = end = offsets[first.name]
        views = []
        for piece in pieces:
            views.append(segment.read(end, piece.nbytes))
            end += piece.nbytes
        fp.add_pieces(first.name, first.dtype, first.shape, views)
        out.append((first.name, tensor_from_raw(segment.buf[start:end], first.dtype, first.shape)))
    return out
