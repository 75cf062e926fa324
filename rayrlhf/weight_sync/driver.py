"""`WeightSync`: drives one sync from the driver process, over the trainer ranks (`WeightSender`)
and the engines (`WeightReceiver`).

After each policy update the trainer's new weights go into every vLLM engine a bucket (many
parameters) at a time, hashed on both ends; an engine whose fingerprint differs from the
trainer's raises `WeightSyncError`. The protocol, per transport (T: every trainer rank, T0: rank
0 alone, E: every engine); calls on one line run together:

    shared_memory (set-up, once): T0 open_segment(create) -> T1.. and E open_segment ->
        T0 unlink_segment.
      per sync, for k = 0, 1, ...: T write_bucket_to_segment(k) -> E load_segment_bucket(k,
        the ranks' results); then T1.. sent_records -> T0 sync_result -> E finish_load.
    object_store, per sync, for k = 0, 1, ...: T put_bucket(k) -> E load_bucket(k, the ranks'
        results); then T1.. sent_records -> T0 sync_result -> E finish_load.
    broadcast (set-up, once): T0 init_weight_group, E init_weight_group (one group).
      per sync: T broadcast_weights, E receive_weights.

Bucket 0 opens a sync on both ends and `finish_load` closes it; buckets go in order. In the
streamed transports bucket k+1 is sent while the engines load bucket k, and at most
`max_in_flight` buckets run ahead of the loads, which bounds the memory a sync holds to about
(max_in_flight + 1) x bucket_mb. Ray orders each bucket's load after its puts, because the load
takes their results as arguments.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from rayrlhf.config import SyncConfig
from rayrlhf.types import SyncResult
from rayrlhf.weight_sync.broadcast import GroupAddress, resolve_backend
from rayrlhf.weight_sync.shared_memory import new_segment_path, segment_offsets

Get = Callable[[Any, str], Any]
"""`get(refs, phase)`: wait for Ray refs, bounded, with an error that names the phase."""


class WeightSync:
    """The sync of one run: its transport, set up once, and the calls of each sync.

    `policy`: the policy's rank actors (`WeightSender`), rank 0 first; `engines`: the rollout
    engine actors (`WeightReceiver`); `nodes`: the Ray node ids of the policy and rollout
    bundles; `policy_gpus`, `engine_gpus`: GPUs per policy rank and per engine bundle. Where
    the ranks and engines run decides `auto`, never the driver's own process.
    """

    def __init__(
        self,
        policy: list,
        engines: list,
        cfg: SyncConfig,
        get: Get,
        nodes: set[str],
        policy_gpus: float = 0,
        engine_gpus: float = 0,
    ) -> None:
        self.policy, self.engines, self.cfg, self.get = policy, list(engines), cfg, get
        self.gpus = policy_gpus > 0 and engine_gpus > 0
        self._num_buckets: dict[float, int] = {}
        self._syncs = 0  # syncs so far: every `verify_every`-th hashes the bytes
        self.transport = self._resolve_transport(nodes)
        if self.transport == "shared_memory":
            self.open_segment()
        elif self.transport == "broadcast":
            self._init_broadcast_group()

    def _resolve_transport(self, nodes: set[str]) -> str:
        """`cfg.transport`, with 'auto' made concrete: with GPUs on both ends, the broadcast
        (NCCL, GPU to GPU: the host-memory transports would copy every weight to the host and
        back); else shared memory when the policy ranks and the engines share one node and its
        /dev/shm has room for the segment, else the object store."""
        wanted = self.cfg.transport
        if wanted == "auto" and self.gpus:
            return "broadcast"
        if wanted not in ("auto", "shared_memory"):
            return wanted
        if len(nodes) > 1:
            if wanted == "auto":
                return "object_store"
            raise ValueError(
                f"sync.transport=shared_memory needs the policy ranks and the engines on one "
                f"node; they are on {len(nodes)}. Use auto or object_store"
            )
        metas = self.get(self.policy[0].param_metas.remote(), "sync set-up")
        need = segment_offsets(metas)[1]
        free = self.get(self.policy[0].free_shared_memory.remote(), "sync set-up")
        if wanted == "auto" and free < 2 * need:  # leave room for Ray's object store
            print(
                f"rayrlhf: weight sync through the object store: /dev/shm has {free / 2**30:.1f} "
                f"GiB free, short of twice the {need / 2**30:.1f} GiB segment",
                flush=True,
            )
            return "object_store"
        return "shared_memory"

    def set_engines(self, engines: list, nodes: set[str]) -> None:
        """The pool changed (an engine replaced, added or removed): set the transport up again
        over `engines`, so that the next sync reaches exactly them. An engine on another node
        than the policy turns `auto`'s shared memory into the object store; the broadcast group
        is built anew (the old one is dropped by every member as it joins the new)."""
        self.engines = list(engines)
        self.transport = self._resolve_transport(nodes)
        if self.transport == "shared_memory":
            self.open_segment()
        elif self.transport == "broadcast":
            self._init_broadcast_group()

    def open_segment(self) -> None:
        """Map one shared segment, the size of the policy's weights, into every policy rank and
        engine (one node), then unlink its name: the memory goes when the last process that
        maps it exits, however the run ends."""
        path = new_segment_path()
        metas = self.get(self.policy[0].param_metas.remote(), "sync set-up")
        self.get(self.policy[0].open_segment.remote(path, create=True), "sync set-up")
        try:
            opens = [p.open_segment.remote(path) for p in self.policy[1:]]
            opens += [e.open_segment.remote(path, metas) for e in self.engines]
            self.get(opens, "sync set-up")
        finally:
            self.get(self.policy[0].unlink_segment.remote(), "sync set-up")

    def _init_broadcast_group(self) -> None:
        """One group of policy rank 0 + every engine worker, in engine order. Rank 0 hosts the
        group's TCPStore, so the rendezvous is an address on rank 0's node, which rank 0 reports
        itself."""
        backend = resolve_backend(self.cfg.backend, self.gpus)
        if backend == "nccl" and not self.gpus:
            raise ValueError(
                "sync.backend nccl needs GPUs on both ends: policy.resources.num_gpus and "
                "rollout.resources.num_gpus"
            )
        plan = self.get(self.policy[0].sync_plan.remote(self.cfg.bucket_mb), "sync plan")
        host, port = self.get(self.policy[0].sync_group_address.remote(), "sync group address")
        sizes = self.get([e.num_workers.remote() for e in self.engines], "sync group")
        group = GroupAddress(host, port, 1 + sum(sizes), backend, self.cfg.group_timeout_s)
        members = f"{group.world_size} members"
        where = f"rendezvous {host}:{port} (policy rank 0's node)"
        print(f"rayrlhf: weight sync group: {backend}, {members}, {where}", flush=True)
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        joins = [self.policy[0].init_weight_group.remote(group)]
        joins += [
            e.init_weight_group.remote(group, off, plan) for e, off in zip(self.engines, offsets)
        ]
        self.get(joins, "sync group")

    def sync(
        self,
        bucket_mb: float | None = None,
        max_in_flight: int | None = None,
        gather: bool = False,
        hash_bytes: bool | None = None,
        transport: str | None = None,
        counted: bool = True,
    ) -> SyncResult:
        """Push the policy's new weights into every engine and verify them there: the bytes on
        the first and every `verify_every`-th sync, names, dtypes, shapes and sizes always. An
        extra sync (`counted` False: a newcomer's) leaves that schedule as it was.

        The arguments are for the benchmark's baselines and ablations (see `streamed`):
        `transport` may pick the object store over shared memory; the broadcast's bucket plan is
        fixed at set-up.
        """
        mb = bucket_mb or self.cfg.bucket_mb
        if hash_bytes is None:
            hash_bytes = self._syncs % self.cfg.verify_every == 0
        self._syncs += counted
        transport = transport or self.transport
        if transport == "broadcast":
            return self.broadcast(mb, hash_bytes)
        ahead = self.cfg.max_in_flight if max_in_flight is None else max_in_flight
        return self.streamed(mb, ahead, gather, hash_bytes, transport == "shared_memory")

    def broadcast(self, bucket_mb: float, hash_bytes: bool = True) -> SyncResult:
        """One sync over the broadcast group: every rank gathers, rank 0 sends."""
        calls = [a.broadcast_weights.remote(bucket_mb, hash_bytes) for a in self.policy]
        calls += [e.receive_weights.remote(hash_bytes) for e in self.engines]
        return self.get(calls, "sync")[0]

    def num_buckets(self, bucket_mb: float) -> int:
        if bucket_mb not in self._num_buckets:
            n = self.get(self.policy[0].num_buckets.remote(bucket_mb), "sync")
            self._num_buckets[bucket_mb] = n
        return self._num_buckets[bucket_mb]

    def streamed(
        self,
        bucket_mb: float,
        max_in_flight: int,
        gather: bool = False,
        hash_bytes: bool = True,
        segment: bool = False,
    ) -> SyncResult:
        """Stream buckets: every rank sends its partition of bucket k, into the shared `segment`
        or the object store, and every engine loads it as soon as all pieces are there, while
        the ranks send k+1; at most `max_in_flight` buckets run ahead of the engines' loads.
        Peers' per-parameter sync is one parameter per bucket, `max_in_flight` 0 and `gather`
        (rank 0 gathers and puts each parameter; always through the object store)."""
        segment = segment and not gather
        pending: deque[list] = deque()
        for k in range(self.num_buckets(bucket_mb)):
            pending.append(self._send_bucket(k, bucket_mb, gather, hash_bytes, segment))
            while len(pending) > max_in_flight:
                self.get(pending.popleft(), "sync")
        for refs in pending:
            self.get(refs, "sync")
        sent = self.policy[0].sync_result.remote(
            *[a.sent_records.remote() for a in self.policy[1:]]
        )
        self.get([e.finish_load.remote(sent) for e in self.engines], "sync")
        return self.get(sent, "sync")

    def _send_bucket(
        self, k: int, bucket_mb: float, gather: bool, hash_bytes: bool, segment: bool
    ) -> list:
        """Start bucket k's sends and, after them, its loads; the refs of all of them."""
        if segment:
            put = [a.write_bucket_to_segment.remote(k, bucket_mb, hash_bytes) for a in self.policy]
            load = [e.load_segment_bucket.remote(k, hash_bytes, *put) for e in self.engines]
        else:
            put = [a.put_bucket.remote(k, bucket_mb, gather, hash_bytes) for a in self.policy]
            load = [e.load_bucket.remote(k, hash_bytes, *put) for e in self.engines]
        return put + load

    def policy_fingerprint(self, parts: int = 1) -> str:
        """What a sync must deliver: the fingerprint of the policy's current weights, each tensor
        whole (`parts` 1) or in the pieces `parts` ranks send. Gathers every bucket."""
        calls = [a.fingerprint.remote(self.cfg.bucket_mb, parts) for a in self.policy]
        return self.get(calls, "fingerprint")[0]
