"""Will a run fit on a cluster? Checked before any resource is reserved: placement, then memory.

Ray keeps an unplaceable placement group pending (forever, or until an autoscaler adds a node), so
`placement.reserve` can only report a misfit after `placement_timeout_s`. This module answers the
same question in milliseconds from the cluster's shape (`cluster.shape`): the node types, how many
of each, and what one node offers. Every role's bundles are packed first-fit onto node instances
in the order the run reserves them (policy, critic, reference, judge, reward, rollout), each role
PACKed onto one node when one can hold all of them, as Ray's PACK strategy prefers, and each
tensor-parallel engine's group onto one node (STRICT_PACK). A misfit is a `PlacementError` naming
the role and what it lacks. Then the memory plan (`cluster.memory`) estimates each role's GPUs
where the shape says how much memory they have, and refuses a role that does not fit.

The shape comes from a YAML file (`deploy/cluster-shapes/`) or from the live cluster
(`cluster_shape_from_ray`): its alive nodes, plus the nodes an autoscaler reports it may still add.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

# cluster_shape_from_ray is re-exported: the recipes take it from here.
from rayrlhf.cluster.live import cluster_shape_from_ray, live_shape  # noqa: F401
from rayrlhf.cluster.memory import Capacity, check_memory, format_memory, plan_memory
from rayrlhf.cluster.placement import PlacementError, bundle, engine_layout
from rayrlhf.cluster.shape import (
    EPS,
    Bundle,
    ClusterShape,
    fmt_bundle,
    nonzero,
    num,
    ordered,
)
from rayrlhf.config import ConfigError, TrainConfig, load_config


@dataclass
class _Node:
    label: str
    kind: str
    """Its node type's name."""
    free: Bundle


@dataclass(frozen=True)
class RolePlacement:
    """Where one role's bundles landed."""

    role: str
    bundle: Bundle
    nodes: tuple[str, ...]
    """Label of the node instance holding each bundle, e.g. 'trainer[0]'."""


class RoleRequest(NamedTuple):
    """What one role asks for: `groups` placement groups of `count` bundles each."""

    role: str
    bundle: Bundle
    count: int
    groups: int = 1
    """Placement groups: 1, or one per engine for tensor-parallel engines."""
    strict: bool = False
    """STRICT_PACK: each group's bundles on one node (a tensor-parallel engine's)."""


def role_bundles(cfg: TrainConfig) -> list[RoleRequest]:
    """What every role reserves, in the order `Roles` reserves them. PlacementError if the
    engines are laid out in a way vLLM cannot start (`engine_layout`)."""
    critic = cfg.active_critic  # None for critic-free estimators: nothing reserved
    judge = cfg.reward.judge  # reward.judge's engines, in a group of their own
    layout = engine_layout(cfg.rollout)
    strict = layout.strategy == "STRICT_PACK"
    # Engines of one bundle each have a group apiece, which places as one PACK group would.
    engines, groups = (layout.bundles, layout.groups) if strict else (layout.groups, 1)
    return [
        RoleRequest("policy", bundle(cfg.policy.resources), cfg.policy.num_ranks),
        *([RoleRequest("critic", bundle(critic.resources), critic.num_ranks)] if critic else []),
        RoleRequest("reference", bundle(cfg.reference.resources), 1),
        *([RoleRequest("judge", bundle(judge.resources), judge.num_engines)] if judge else []),
        RoleRequest("reward", bundle(cfg.reward.resources), 1),
        RoleRequest("rollout", bundle(cfg.rollout.resources), engines, groups, strict),
    ]


def cpus_needed(cfg: TrainConfig) -> float:
    """Logical CPUs that every role's bundles of a PPO run add up to, with room for the engines
    up to `rollout.max_engines` (what a local Ray is started with)."""
    ro = cfg.rollout
    room = max(0, (ro.max_engines or 0) - ro.num_engines) * ro.tensor_parallel_size
    total = sum(r.bundle.get("CPU", 0.0) * r.count * r.groups for r in role_bundles(cfg))
    return total + room * ro.resources.num_cpus


def plan_placement(cfg: TrainConfig, shape: ClusterShape) -> list[RolePlacement]:
    """Pack every role; raises PlacementError naming the first role that does not fit."""
    plan, error = _pack(cfg, shape)
    if error:
        raise PlacementError(error)
    return plan


def gpu_capacity(plan: list[RolePlacement], shape: ClusterShape) -> Capacity:
    """`capacity(role)`: GiB of a GPU where the role landed (the smallest, if on several node
    types), None if a node type there does not say."""
    memory = {t.name: t.gpu_memory_gib for t in shape.node_types}
    kinds = {p.role: {label.rsplit("[", 1)[0] for label in p.nodes} for p in plan}

    def capacity(role: str) -> float | None:
        values = [memory[k] for k in kinds.get(role, ())]
        return None if not values or None in values else min(values)

    return capacity


def check_capacity(cfg: TrainConfig, shape: ClusterShape) -> None:
    """Raise PlacementError, naming the role and what it lacks, if the run cannot be placed,
    or MemoryPlanError if a role does not fit in its GPUs' memory."""
    plan = plan_placement(cfg, shape)
    check_memory(plan_memory(cfg, shape.models, gpu_capacity(plan, shape)))


def _pack(cfg: TrainConfig, shape: ClusterShape) -> tuple[list[RolePlacement], str | None]:
    try:
        roles = role_bundles(cfg)
    except PlacementError as err:
        return [], str(err)
    # An autoscaled type never needs more nodes than there are bundles.
    nodes = _instances(shape, cap=sum(r.count * r.groups for r in roles))
    plan: list[RolePlacement] = []
    for r in roles:
        labels: list[str] = []
        for i in range(r.groups):
            before = [_Node(x.label, x.kind, dict(x.free)) for x in nodes]
            placed = (_place_strict if r.strict else _place)(nodes, r.bundle, r.count)
            if placed is None:
                earlier = [p.role for p in plan]
                why = _explain(r.role, r.bundle, r.count, before, shape, earlier)
                if r.strict:
                    why = _explain_group(r, i, why)
                return plan, why
            labels += placed
        plan.append(RolePlacement(r.role, r.bundle, tuple(labels)))
    return plan, None


def _explain_group(r: RoleRequest, i: int, why: str) -> str:
    """Say that one tensor-parallel engine's bundles must share a node."""
    return (
        f"{why}; each engine's {r.count} bundles must share one node (its tensor-parallel "
        f"group, STRICT_PACK), and engine {i} of {r.groups} finds none"
        + (f" after engines 0-{i - 1}" if i else "")
    )


def _instances(shape: ClusterShape, cap: int) -> list[_Node]:
    out = []
    for t in shape.node_types:
        count = cap if t.count is None else t.count
        out += [_Node(f"{t.name}[{i}]", t.name, t.capacity()) for i in range(count)]
    return out


def _fits(free: Bundle, need: Bundle, times: int = 1) -> bool:
    return all(free.get(k, 0.0) + EPS >= v * times for k, v in need.items() if v > 0)


def _take(free: Bundle, need: Bundle) -> None:
    for k, v in need.items():
        free[k] = free.get(k, 0.0) - v


def _place_strict(nodes: list[_Node], b: Bundle, n: int) -> list[str] | None:
    """STRICT_PACK: all n bundles on the first node that holds them, or None."""
    for node in nodes:
        if _fits(node.free, b, n):
            for _ in range(n):
                _take(node.free, b)
            return [node.label] * n
    return None


def _place(nodes: list[_Node], b: Bundle, n: int) -> list[str] | None:
    """PACK: one node for all n bundles if any can; else first-fit. All or nothing, like Ray."""
    one_node = _place_strict(nodes, b, n)
    if one_node is not None:
        return one_node
    trial = [dict(x.free) for x in nodes]
    labels = []
    for _ in range(n):
        i = next((i for i, free in enumerate(trial) if _fits(free, b)), None)
        if i is None:
            return None
        _take(trial[i], b)
        labels.append(nodes[i].label)
    for node, free in zip(nodes, trial):
        node.free = free
    return labels


def _explain(
    role: str, b: Bundle, n: int, nodes: list[_Node], shape: ClusterShape, earlier: list[str]
) -> str:
    """Why `n` bundles `b` do not fit on `nodes` (the free space left by the earlier roles)."""
    head = f"{role}: needs {n} x {fmt_bundle(b)}"
    types = [t for t in shape.node_types if t.count != 0]
    offered = {k for t in types for k, v in t.capacity().items() if v > 0}
    missing = ordered(k for k, v in b.items() if v > 0 and k not in offered)
    if missing:
        names = ", ".join(t.name for t in types) or "none"
        return f"{head} per bundle, but no node type offers {', '.join(missing)} ({names})"
    able = [t.name for t in types if _fits(t.capacity(), b)]
    if not able:
        short = "; ".join(f"{t.name} has {_shortfall(t.capacity(), b)}" for t in types)
        return f"{head} per bundle, but no single node can hold one bundle: {short} per node"
    after = f" after {', '.join(earlier)}" if earlier else ""
    # Only nodes of a type that can hold a bundle count: free CPUs elsewhere do not help.
    pool = [x for x in nodes if x.kind in able]
    free = {k: sum(x.free.get(k, 0.0) for x in pool) for k in b}
    short = ordered(k for k, v in b.items() if v * n > free[k] + EPS)
    if short:
        need = ", ".join(f"{num(b[k] * n)} {k}" for k in short)
        have = ", ".join(f"{num(free[k])} {k}" for k in short)
        return (
            f"{head}, {need} in all (on one node if PACK can), but the {'/'.join(able)} "
            f"nodes that can hold one have {have} free{after}"
        )
    fit = sum(_how_many(x.free, b) for x in pool)
    room = ", ".join(f"{x.label} {fmt_bundle(nonzero(x.free))}" for x in pool)
    return (
        f"{head}: enough in total, but the free space is split across nodes and only {fit} "
        f"bundles fit{after} (free: {room})"
    )


def _shortfall(cap: Bundle, b: Bundle) -> str:
    short = ordered(k for k, v in b.items() if cap.get(k, 0.0) + EPS < v)
    return ", ".join(f"{k} {num(cap.get(k, 0.0))}" for k in short)


def _how_many(free: Bundle, b: Bundle) -> int:
    counts = [int((free.get(k, 0.0) + EPS) // v) for k, v in b.items() if v > 0]
    return min(counts) if counts else 0


def format_plan(plan: list[RolePlacement]) -> str:
    """A table: role, bundle count, one bundle, and the nodes that hold them."""
    rows = [("role", "bundles", "per bundle", "placed on")]
    for p in plan:
        where = ", ".join(f"{label} x{c}" for label, c in Counter(p.nodes).items())
        rows.append((p.role, str(len(p.nodes)), fmt_bundle(p.bundle), where))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths)) + "  " + r[3] for r in rows
    )


# ---- `rayrlhf check-placement` ------------------------------------------------------------------


def check_placement_main(config: str | None, overrides: list[str], cluster: str | None) -> int:
    """Print the per-role placement and memory plan; 0 when the run fits, 2 (with the reason)
    when it does not."""
    try:
        cfg = load_config(config, overrides)
        shape = ClusterShape.from_yaml(cluster) if cluster else live_shape(cfg)
    except (ConfigError, FileNotFoundError, ConnectionError) as err:
        print(f"rayrlhf: {err}", file=sys.stderr)
        return 2
    print(f"cluster ({cluster or 'live'}):\n{shape.describe()}\n")
    plan, error = _pack(cfg, shape)
    if plan:
        print(format_plan(plan))
    if error:
        print(f"rayrlhf: not placeable: {error}", file=sys.stderr)
        return 2
    memory = plan_memory(cfg, shape.models, gpu_capacity(plan, shape))
    print(f"\n{format_memory(memory)}")
    try:
        check_memory(memory)
    except PlacementError as err:
        print(f"rayrlhf: {err}", file=sys.stderr)
        return 2
    print("\nplaceable: every role fits, in its GPUs' memory too where the shape gives it")
    return 0
