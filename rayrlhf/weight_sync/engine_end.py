"""The engine end of every transport: `WeightReceiver`, mixed into the rollout engine actor.

Each method forwards to `WeightSyncExtension` on every vLLM worker of the engine, naming the
extension's method by its `__name__`, so both ends share one definition of every RPC name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rayrlhf.config import RolloutConfig
from rayrlhf.types import SyncResult
from rayrlhf.weight_sync.broadcast import GroupAddress
from rayrlhf.weight_sync.object_store import StoredPieces
from rayrlhf.weight_sync.records import ParamMeta
from rayrlhf.weight_sync.shared_memory import SegmentPiece
from rayrlhf.weight_sync.vllm_extension import WeightSyncExtension

EXTENSION = f"{WeightSyncExtension.__module__}.{WeightSyncExtension.__qualname__}"
"""vLLM's `worker_extension_cls` for an engine that receives weights."""


class WeightReceiver:
    """Receives weights into one vLLM engine and checks them.

    Relies on the actor it is mixed into for `self.llm` (a `vllm.LLM` built with
    `worker_extension_cls=EXTENSION`) and `self.cfg` (its `RolloutConfig`). Shared memory:
    `open_segment` once, then per sync `load_segment_bucket` for buckets 0, 1, ... and
    `finish_load`. Object store: `load_bucket` for buckets 0, 1, ... and `finish_load`.
    Broadcast: `init_weight_group` once, then `receive_weights` per sync.
    """

    llm: Any
    cfg: RolloutConfig

    def _rpc(self, method: Callable, *args: Any) -> list:
        """Run `method` (a `WeightSyncExtension` method) on every vLLM worker of this engine."""
        return self.llm.collective_rpc(method.__name__, args=args)

    def init_hashing(self) -> None:
        """Each vLLM worker hashes the weights it receives on its share of the engine's CPUs."""
        threads = max(1, int(self.cfg.resources.num_cpus) // self.cfg.tensor_parallel_size)
        self._rpc(WeightSyncExtension.rr_init_hashing, threads)

    def load_bucket(self, index: int, hash_bytes: bool, *stored: StoredPieces | None) -> None:
        """Object store: load bucket `index` from the pieces the trainer ranks put (their
        `put_bucket` results, in rank order); Ray starts this call once they are all there."""
        self._rpc(WeightSyncExtension.rr_load_bucket, index, hash_bytes, stored)

    def open_segment(self, path: str, metas: list[ParamMeta]) -> None:
        """Shared memory: map the node's weight segment (see `SharedSegment`)."""
        self._rpc(WeightSyncExtension.rr_open_segment, path, metas)

    def load_segment_bucket(
        self, index: int, hash_bytes: bool, *written: list[SegmentPiece]
    ) -> None:
        """Shared memory: load bucket `index` from the segment, once every trainer rank has
        written its piece (their `write_bucket_to_segment` results, in rank order, say what)."""
        self._rpc(WeightSyncExtension.rr_load_segment_bucket, index, hash_bytes, written)

    def finish_load(self, sent: SyncResult) -> list[str]:
        """Object store and shared memory: end the sync and check it against what the trainer
        sent; one fingerprint per vLLM worker."""
        return self._rpc(WeightSyncExtension.rr_finish_load, sent.fingerprint)

    def num_workers(self) -> int:
        """vLLM workers in this engine (= tensor-parallel size): members of a sync group."""
        return self.cfg.tensor_parallel_size

    def init_weight_group(
        self, group: GroupAddress, rank_offset: int, plan: list[list[ParamMeta]]
    ) -> list[int]:
        """Broadcast: join the sync group, this engine's workers as ranks `rank_offset`, ...
        (blocks until the trainer joins too); `plan` is the bucket plan every sync follows."""
        return self._rpc(WeightSyncExtension.rr_init_group, group, rank_offset, plan)

    def receive_weights(self, hash_bytes: bool) -> list[str]:
        """Broadcast: receive one sync and check it; runs while the trainer broadcasts."""
        return self._rpc(WeightSyncExtension.rr_receive_broadcast, hash_bytes)
