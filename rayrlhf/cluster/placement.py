"""Resource groups: one Ray placement group per role, one bundle per actor of the role.

On a GPU cluster a bundle holds the role's GPUs; on CPU it holds logical CPUs, so each role still
gets its own reservation and its actors never compete for another role's slot. Reservation is
bounded in time: an unplaceable request is an error naming the role and what it asked for.
Also here: joining or starting the cluster, and starting a ZeRO-3 group's ranks in their bundles,
which every recipe (PPO, DPO, SFT, reward model) does the same way.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayrlhf.cluster.waits import bounded_get
from rayrlhf.config import RankGroupConfig, Resources


class PlacementError(RuntimeError):
    """A role's resources cannot be reserved on this cluster."""


def bundle(res: Resources) -> dict[str, float]:
    """One actor's reservation as a Ray bundle."""
    out = {"CPU": res.num_cpus, **res.custom}
    if res.num_gpus:
        out["GPU"] = res.num_gpus
    return out


def reserve(role: str, res: Resources, count: int, timeout_s: float = 60.0) -> PlacementGroup:
    """Reserve `count` bundles for `role`, or raise PlacementError within `timeout_s`."""
    pg = placement_group([bundle(res)] * count, strategy="PACK", name=f"rayrlhf-{role}")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise PlacementError(
            f"{role}: could not reserve {count} x {bundle(res)} within {timeout_s:.0f}s; "
            f"free on the cluster: {ray.available_resources()}"
        )
    return pg


def actor_options(pg: PlacementGroup, index: int, res: Resources) -> dict:
    """`.options(...)` that pin an actor to bundle `index` of its role's group."""
    return {
        "num_cpus": res.num_cpus,
        "num_gpus": res.num_gpus,
        "resources": dict(res.custom) or None,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=index
        ),
    }


def threads_for(res: Resources) -> int:
    """torch threads for an actor: its bundle's CPUs."""
    return max(1, int(res.num_cpus))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now on `host` (for a rendezvous store)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@ray.remote(num_cpus=0)
def address_and_port() -> tuple[str, int]:
    """Run inside a role's bundle: the node's IP and a free port there (rank 0's rendezvous)."""
    ip = ray.util.get_node_ip_address()
    return ip, free_port(ip)


def start_ray(address: str | None, cpus_needed: float) -> None:
    """Join `address`, the Ray job's cluster, or start a local one with a logical CPU for each
    bundle (more than the cores if need be: each role still gets its own reservation)."""
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(address=address or "auto")
        return
    ray.init(num_cpus=max(int(cpus_needed + 0.999), os.cpu_count() or 1), include_dashboard=False)


@dataclass(frozen=True)
class RankSpec:
    """What one ZeRO-3 rank actor is told: where it sits in its group and how it steps."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    grad_accum_steps: int
    """Micro-batches per optimizer step on each rank."""
    seed: int
    num_threads: int
    group: RankGroupConfig
    """The group's model, batch split and optimizer settings."""

    @property
    def micro_batch_size(self) -> int:
        return self.group.micro_batch_size


def start_zero3_ranks(
    cls: type,
    pg: PlacementGroup,
    group: RankGroupConfig,
    grad_accum_steps: int,
    seed: int,
    timeout_s: float = 60.0,
) -> list:
    """One `cls(model_path, RankSpec)` actor per bundle of `pg`, rank 0's rendezvous in bundle
    0. Returns once the rendezvous address is known (within `timeout_s`), without waiting for
    the actors: the caller waits for `__ray_ready__`."""
    res = group.resources
    strategy = actor_options(pg, 0, res)["scheduling_strategy"]
    where = address_and_port.options(scheduling_strategy=strategy).remote()
    addr, port = bounded_get(where, timeout_s, "rendezvous address")
    ranks = []
    for rank in range(group.num_ranks):
        spec = RankSpec(
            rank, group.num_ranks, addr, port, grad_accum_steps, seed, threads_for(res), group
        )
        actor = ray.remote(cls).options(**actor_options(pg, rank, res))
        ranks.append(actor.remote(group.model_path, spec))
    return ranks
