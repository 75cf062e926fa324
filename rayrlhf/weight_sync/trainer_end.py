"""The trainer end of every transport: `WeightSender`, mixed into the policy's ZeRO-3 rank actor."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from rayrlhf.cluster.placement import node_address_and_port
from rayrlhf.types import SyncResult
from rayrlhf.weight_sync import zero3
from rayrlhf.weight_sync.broadcast import GroupAddress, group_device, send_broadcast
from rayrlhf.weight_sync.object_store import StoredPieces, store
from rayrlhf.weight_sync.records import (
    Fingerprint,
    ParamMeta,
    PieceRecord,
    digest,
    dtype_name,
    plan_buckets,
    raw_bytes,
)
from rayrlhf.weight_sync.shared_memory import (
    SegmentPiece,
    SharedSegment,
    segment_offsets,
    segment_write,
    shared_memory_free,
)


class WeightSender:
    """Sends one rank's weights to the engines, and records what it sent.

    Mixed into a DeepSpeed ZeRO-3 role, whose attributes it relies on: `self.module` (the
    partitioned model), `self.spec.rank` and `self.spec.world_size` (this rank, of how many).
    Shared memory and object store: every rank sends its own partition of buckets 0, 1, ... in
    turn (`write_bucket_to_segment` or `put_bucket`; index 0 starts a sync), then rank 0 sums
    up (`sync_result`, given the other ranks' `sent_records`). Broadcast: every rank runs
    `broadcast_weights` together (the gathers are collective); rank 0 alone sends.
    """

    module: torch.nn.Module
    spec: Any

    def param_metas(self) -> list[ParamMeta]:
        """Full name, shape and dtype of every parameter, in sync order."""
        return zero3.param_metas(self.module)

    def sync_plan(self, bucket_mb: float) -> list[list[ParamMeta]]:
        """The bucket plan both ends of a sync follow (the same on every rank)."""
        plans = vars(self).setdefault("_sync_plans", {})
        if bucket_mb not in plans:
            plans[bucket_mb] = plan_buckets(self.param_metas(), int(bucket_mb * 2**20))
        return plans[bucket_mb]

    def num_buckets(self, bucket_mb: float) -> int:
        return len(self.sync_plan(bucket_mb))

    # ---- shared memory ---------------------------------------------------------------------

    def free_shared_memory(self) -> int:
        """Bytes free in this node's /dev/shm, where a shared-memory sync's segment goes."""
        return shared_memory_free()

    def open_segment(self, path: str, create: bool = False) -> None:
        """Map the node's weight segment (rank 0 creates it)."""
        self._offsets, nbytes = segment_offsets(self.param_metas())
        self._segment = SharedSegment(path, nbytes, create)

    def unlink_segment(self) -> None:
        """Once every rank and engine has mapped the segment: remove its name from /dev/shm."""
        self._segment.unlink()

    def write_bucket_to_segment(
        self, index: int, bucket_mb: float, hash_bytes: bool = True
    ) -> list[SegmentPiece]:
        """Copy this rank's ZeRO-3 partition of bucket `index`, straight from DeepSpeed's buffer
        (no collective), to where the joined tensors live in the segment; what was written is
        what the engines read."""
        metas = self._begin(index, bucket_mb, hash_bytes)
        pieces = self._record(self._local(metas), metas)
        rank, world = self.spec.rank, self.spec.world_size
        return segment_write(self._segment, self._offsets, pieces, metas, rank, world)

    # ---- object store ----------------------------------------------------------------------

    def put_bucket(
        self, index: int, bucket_mb: float, gather: bool = False, hash_bytes: bool = True
    ) -> StoredPieces | None:
        """`ray.put` this rank's ZeRO-3 partition of bucket `index` (no collective) for the
        engines to join. `gather` is peers' way, kept as the benchmark's baseline: gather the
        full parameters (collective) and rank 0 alone puts them; None on the other ranks."""
        metas = self._begin(index, bucket_mb, hash_bytes)
        if not gather:
            return store(self._record(self._local(metas), metas), metas)
        with zero3.gathered(self.module, metas, self.spec.rank) as bucket:
            return store(self._record(bucket, metas), metas) if bucket else None

    # ---- what a streamed sync sent ---------------------------------------------------------

    def _begin(self, index: int, bucket_mb: float, hash_bytes: bool) -> list[ParamMeta]:
        """Bucket `index`'s parameters; index 0 starts a new record of what is sent."""
        if index == 0:
            self._sent: list[PieceRecord] = []
            self._sent_buckets = 0
            self._hashed = hash_bytes
        return self.sync_plan(bucket_mb)[index]

    def _local(self, metas: list[ParamMeta]) -> list[tuple[str, Tensor]]:
        return zero3.local_pieces(self.module, metas, self.spec.rank, self.spec.world_size)

    def _record(
        self, pieces: list[tuple[str, Tensor]], metas: list[ParamMeta]
    ) -> list[tuple[str, Tensor]]:
        """Record the pieces as sent (hashed unless this sync skips it); returns them on the
        host (GPU: one copy, for both uses)."""
        pieces = [(name, t.detach().cpu()) for name, t in pieces]
        for (name, t), m in zip(pieces, metas):
            raw = raw_bytes(t)
            hashed = digest(raw) if self._hashed else b""
            self._sent.append(PieceRecord(name, dtype_name(m.dtype), m.shape, hashed, raw.nbytes))
        self._sent_buckets += 1
        return pieces

    def sent_records(self) -> list[PieceRecord]:
        """What this rank sent since bucket 0 of this sync."""
        return self._sent

    def sync_result(self, *other_ranks: list[PieceRecord]) -> SyncResult:
        """Rank 0, given the other ranks' `sent_records`: what the sync sent, as a whole."""
        fp = Fingerprint.combine([self._sent, *other_ranks])
        return SyncResult(
            fp.hexdigest(), fp.num_bytes, fp.num_tensors, self._sent_buckets, self._hashed
        )

    # ---- broadcast -------------------------------------------------------------------------

    def sync_group_address(self) -> tuple[str, int]:
        """Rank 0: its node's address and a free port there. Rank 0 hosts the broadcast group's
        TCPStore, whose master connects to the host it is given, so the rendezvous must be this
        node's, not the driver's (a CPU-only head in the cluster manifests)."""
        return node_address_and_port()

    def init_weight_group(self, group: GroupAddress) -> None:
        """Rank 0 only: join the sync group as its rank 0."""
        self._sync_device = group_device(group.backend)
        self._sync_group = group.join(0)

    def _gathered_buckets(self, bucket_mb: float) -> Iterator[list[tuple[str, Tensor]]]:
        return zero3.gathered_buckets(self.module, self.sync_plan(bucket_mb), self.spec.rank)

    def broadcast_weights(self, bucket_mb: float, hash_bytes: bool = True) -> SyncResult | None:
        """Gather buckets (all ranks), rank 0 broadcasts them; None on the other ranks."""
        buckets = self._gathered_buckets(bucket_mb)
        if self.spec.rank != 0:
            for _ in buckets:
                pass
            return None
        try:
            fp, n = send_broadcast(self._sync_group, buckets, self._sync_device, hash_bytes)
            return SyncResult(fp.hexdigest(), fp.num_bytes, fp.num_tensors, n, hash_bytes)
        except Exception as err:  # a member died or the group timed out
            failure = f"{type(err).__name__}: {str(err).strip()[:300]}"
        # Out of the except block the traceback, which holds the group, is gone: aborting it
        # (NCCL's communicators) and dropping the last reference (gloo's connections) makes the
        # members still waiting on a bucket fail now, not after group_timeout_s, and free for
        # the next set-up. The other ranks' gathers are collectives, so rank 0 keeps in step.
        if self._sync_group is not None:
            self._sync_group.abort()
        self._sync_group = None
        gc.collect()
        for _ in buckets:
            pass
        raise RuntimeError(f"weight broadcast to the engines failed ({failure})")

    def fingerprint(self, bucket_mb: float, parts: int = 1) -> str | None:
        """Fingerprint of the current full weights as a sync sends them: each tensor whole
        (`parts` 1: the broadcast, or gathered buckets) or in the ranks' pieces (`parts` =
        world size). Rank 0; None elsewhere. Collective."""
        fp = Fingerprint()
        for bucket in self._gathered_buckets(bucket_mb):
            for name, t in bucket:
                fp.update(name, t, parts)
        return fp.hexdigest() if self.spec.rank == 0 else None
