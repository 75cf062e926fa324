"""`WeightSync` on fake actors, no Ray: the order of its calls, the in-flight bound, `auto`."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from rayrlhf.config import SyncConfig
from rayrlhf.types import SyncResult
from rayrlhf.weight_sync.broadcast import GroupAddress
from rayrlhf.weight_sync.driver import WeightSync
from rayrlhf.weight_sync.records import ParamMeta

NUM_BUCKETS = 6
SENT = SyncResult("ab" * 32, num_bytes=100, num_tensors=10, num_buckets=NUM_BUCKETS)


@dataclass(eq=False)
class Ref:
    """What a fake `.remote(...)` returns: the call it stands for."""

    actor: str
    method: str
    args: tuple
    kwargs: dict


@dataclass
class Cluster:
    """Records every call issued and every ref waited for, in one timeline."""

    events: list = field(default_factory=list)
    results: dict = field(default_factory=dict)

    def get(self, refs, phase: str):
        many = isinstance(refs, list)
        for ref in refs if many else [refs]:
            self.events.append(("get", ref))
        values = [self.results.get(r.method) for r in (refs if many else [refs])]
        return values if many else values[0]

    def calls(self, method: str) -> list[Ref]:
        return [r for kind, r in self.events if kind == "call" and r.method == method]

    def waited_before(self, ref: Ref) -> set[int]:
        """ids of the refs waited for before `ref` was issued."""
        out = set()
        for kind, r in self.events:
            if kind == "call" and r is ref:
                return out
            if kind == "get":
                out.add(id(r))
        raise AssertionError(f"{ref} never issued")

    def waited(self) -> set[int]:
        return {id(r) for kind, r in self.events if kind == "get"}


@dataclass
class FakeMethod:
    cluster: Cluster
    actor: str
    method: str

    def remote(self, *args, **kwargs) -> Ref:
        ref = Ref(self.actor, self.method, args, kwargs)
        self.cluster.events.append(("call", ref))
        return ref


@dataclass
class FakeActor:
    """An actor handle whose every `.method.remote(...)` returns a `Ref`, recorded."""

    name: str
    cluster: Cluster

    def __getattr__(self, method: str) -> FakeMethod:
        return FakeMethod(self.cluster, self.name, method)


def _sync(cluster: Cluster, ranks: int = 2, engines: int = 2, **cfg) -> WeightSync:
    cluster.results.update(num_buckets=NUM_BUCKETS, sync_result=SENT, fingerprint="fp")
    policy = [FakeActor(f"policy{r}", cluster) for r in range(ranks)]
    rollout = [FakeActor(f"engine{e}", cluster) for e in range(engines)]
    sync_cfg = SyncConfig(**{"transport": "object_store", "bucket_mb": 1.0, **cfg})
    return WeightSync(policy, rollout, sync_cfg, cluster.get, nodes={"node-a"})


def _buckets(cluster: Cluster, segment: bool) -> list[list[Ref]]:
    """Each bucket's puts and loads, as the driver issued them."""
    put = "write_bucket_to_segment" if segment else "put_bucket"
    load = "load_segment_bucket" if segment else "load_bucket"
    puts, loads = cluster.calls(put), cluster.calls(load)
    return [
        [p for p in puts if p.args[0] == k] + [x for x in loads if x.args[0] == k]
        for k in range(NUM_BUCKETS)
    ]


@pytest.mark.parametrize("segment", [False, True])
@pytest.mark.parametrize("max_in_flight", [0, 1, 2])
def test_in_flight_bound(max_in_flight, segment):
    cluster = Cluster()
    sync = _sync(cluster)
    assert sync.streamed(1.0, max_in_flight, segment=segment) == SENT
    buckets = _buckets(cluster, segment)
    for k, refs in enumerate(buckets):
        puts, loads = refs[:2], refs[2:]
        assert len(puts) == 2 and len(loads) == 2
        assert all(x.args[2:] == tuple(puts) for x in loads)  # each load takes its bucket's puts
        waited = cluster.waited_before(puts[0])
        for j in range(k):
            done = {id(r) for r in buckets[j]} <= waited
            # every bucket below k - max_in_flight is waited for; the ones above still stream
            assert done == (j < k - max_in_flight), (k, j)
    waited = cluster.waited()
    assert all(id(r) in waited for refs in buckets for r in refs)
    (sent,) = cluster.calls("sync_result")
    finishes = cluster.calls("finish_load")
    assert len(finishes) == 2 and all(f.args == (sent,) for f in finishes)
    assert {id(f) for f in finishes} | {id(sent)} <= waited
    assert len(cluster.calls("sent_records")) == 1  # rank 1's, handed to rank 0


def test_sync_hashes_every_verify_every_th_and_picks_its_transport():
    cluster = Cluster()
    sync = _sync(cluster, verify_every=3, max_in_flight=1)
    for _ in range(4):
        sync.sync()
    hashed = [r.args[3] for r in cluster.calls("put_bucket") if r.actor == "policy0"]
    assert hashed == [True] * 6 + [False] * 12 + [True] * 6
    sync.sync(transport="shared_memory", hash_bytes=False)
    assert len(cluster.calls("write_bucket_to_segment")) == 2 * NUM_BUCKETS
    sync.sync(transport="broadcast")
    calls = cluster.calls("broadcast_weights") + cluster.calls("receive_weights")
    assert len(calls) == 4 and all(r.args[-1] is False for r in calls)  # sync 5: 5 % 3 != 0
    assert len(cluster.calls("num_buckets")) == 1  # asked once per bucket size
    assert sync.policy_fingerprint(2) == "fp"


def test_auto_across_nodes_is_the_object_store_and_shared_memory_refuses():
    cluster = Cluster()
    policy, engines = [FakeActor("policy0", cluster)], [FakeActor("engine0", cluster)]
    nodes = {"node-a", "node-b"}
    sync = WeightSync(policy, engines, SyncConfig(transport="auto"), cluster.get, nodes)
    assert sync.transport == "object_store" and not cluster.events
    with pytest.raises(ValueError, match="on one node; they are on 2"):
        WeightSync(policy, engines, SyncConfig(transport="shared_memory"), cluster.get, nodes)


@pytest.mark.parametrize("free,transport", [(10**12, "shared_memory"), (10, "object_store")])
def test_auto_on_one_node_opens_the_segment_when_it_fits(free, transport):
    metas = [ParamMeta("w", (1000,), torch.float32)]  # 4000 bytes: auto wants twice that
    cluster = Cluster(results={"param_metas": metas, "free_shared_memory": free})
    policy = [FakeActor(f"policy{r}", cluster) for r in range(2)]
    engines = [FakeActor("engine0", cluster)]
    sync = WeightSync(policy, engines, SyncConfig(transport="auto"), cluster.get, {"node-a"})
    assert sync.transport == transport
    opens = cluster.calls("open_segment")
    if transport == "object_store":
        assert not opens
        return
    create, *others = opens  # rank 0 creates it; then the others map it; then its name goes
    assert create.actor == "policy0" and create.kwargs == {"create": True}
    assert [o.actor for o in others] == ["policy1", "engine0"]
    assert {o.args[0] for o in opens} == {create.args[0]}
    (unlink,) = cluster.calls("unlink_segment")
    assert {id(o) for o in opens} <= cluster.waited_before(unlink)


def test_broadcast_group_ranks_follow_engine_order_and_meet_on_rank_0s_node():
    # Policy rank 0 hosts the group's TCPStore, so the rendezvous is the address rank 0 reports
    # from its own node; the driver's node (a CPU-only head on a cluster) would hang the group.
    results = {"num_workers": 2, "sync_plan": ["plan"], "sync_group_address": ("10.0.0.7", 1)}
    cluster = Cluster(results=results)
    policy, engines = (
        [FakeActor("policy0", cluster)],
        [FakeActor(f"e{i}", cluster) for i in range(3)],
    )
    cfg = SyncConfig(transport="broadcast", backend="gloo", group_timeout_s=42.0)
    WeightSync(policy, engines, cfg, cluster.get, {"node-a"})
    (where,) = cluster.calls("sync_group_address")
    assert where.actor == "policy0"
    group = GroupAddress("10.0.0.7", 1, 7, "gloo", 42.0)
    (trainer,) = [r for r in cluster.calls("init_weight_group") if r.actor == "policy0"]
    assert trainer.args == (group,)
    joins = [r for r in cluster.calls("init_weight_group") if r.actor != "policy0"]
    offsets = [1, 3, 5]  # 1 + the workers of the engines before
    assert [j.args for j in joins] == [(group, off, ["plan"]) for off in offsets]
    nccl = SyncConfig(transport="broadcast", backend="nccl")
    with pytest.raises(ValueError, match="needs GPUs on both ends"):
        WeightSync(policy, engines, nccl, cluster.get, set(), policy_gpus=1)


@pytest.mark.parametrize(
    "policy_gpus,engine_gpus,backend", [(1, 1, "nccl"), (0, 1, "gloo"), (1, 0, "gloo")]
)
def test_auto_with_gpus_on_both_ends_is_an_nccl_broadcast(policy_gpus, engine_gpus, backend):
    # Decided by where the ranks and engines run (their bundles' GPUs), not by the driver's
    # process, which has no GPU on a cluster: auto once meant gloo and host memory there.
    results = {"num_workers": 1, "sync_plan": [], "sync_group_address": ("h", 1)}
    results |= {"param_metas": [], "free_shared_memory": 10**12}
    cluster = Cluster(results=results)
    policy, engines = [FakeActor("policy0", cluster)], [FakeActor("e0", cluster)]
    auto = SyncConfig(transport="auto", backend="auto")
    sync = WeightSync(policy, engines, auto, cluster.get, {"a", "b"}, policy_gpus, engine_gpus)
    if backend == "gloo":  # without GPUs on both ends: host memory, as before
        assert sync.transport == "object_store" and not cluster.calls("init_weight_group")
        return
    assert sync.transport == "broadcast"
    (trainer,) = cluster.calls("init_weight_group")[:1]
    assert trainer.args[0].backend == "nccl"
    forced = SyncConfig(transport="broadcast", backend="auto")
    WeightSync(policy, engines, forced, cluster.get, {"a"}, policy_gpus=0, engine_gpus=1)
    assert cluster.calls("init_weight_group")[-2].args[0].backend == "gloo"
