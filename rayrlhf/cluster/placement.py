"""Resource groups: one Ray placement group per role, one bundle per actor of the role.

On a GPU cluster a bundle holds the role's GPUs; on CPU it holds logical CPUs, so each role still
gets its own reservation and its actors never compete for another role's slot. Reservation is
bounded in time: an unplaceable request is an error naming the role and what it asked for.
"""

from __future__ import annotations

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayrlhf.config import Resources


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
