"""Will a run's placement groups fit on a cluster? Checked before any resource is reserved.

Ray keeps an unplaceable placement group pending (forever, or until an autoscaler adds a node), so
`placement.reserve` can only report a misfit after `placement_timeout_s`. This module answers the
same question in milliseconds from the cluster's shape: the node types, how many of each, and what
one node offers. Every role's bundles are packed first-fit onto node instances in the order the
run reserves them (policy, critic, reference, reward, rollout), each role PACKed onto one node when
one can hold all of them, as Ray's PACK strategy prefers. A misfit is a `PlacementError` naming the
role and what it lacks.

The shape comes from a YAML file (`deploy/cluster-shapes/`) or from the live cluster
(`cluster_shape_from_ray`): its alive nodes, plus the nodes an autoscaler reports it may still add.
"""

from __future__ import annotations

import socket
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rayrlhf.cluster.placement import PlacementError, bundle
from rayrlhf.config import ConfigError, TrainConfig, format_validation_error, load_config

Bundle = dict[str, float]
_EPS = 1e-6  # fractional amounts (0.125 x 8) must still add up to a whole node
_HEAD_MARKER = "node:__internal_head__"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class NodeType(_Model):
    name: str = Field(min_length=1)
    """Node type (a KubeRay worker group, a `ray up` node type), e.g. 'trainer' or 'rollout'."""
    count: int | None = Field(1, ge=0)
    """Nodes of this type; null means an autoscaler may add as many as the run needs."""
    num_cpus: float = Field(0.0, ge=0)
    """Logical CPUs one node advertises to Ray."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs one node advertises to Ray."""
    memory_gib: float | None = Field(None, gt=0)
    """Memory of one node, shown for reference only: bundles reserve no memory."""
    custom: dict[str, float] = {}
    """Ray custom resources one node advertises, e.g. {"rollout_node": 1}."""

    @model_validator(mode="after")
    def _whole_numbers(self) -> NodeType:
        if {"CPU", "GPU"} & self.custom.keys():
            raise ValueError("set CPU and GPU with num_cpus and num_gpus, not in custom")
        for key, value in self.capacity().items():
            # Ray refuses to start a node with fractional resources; bundles may be fractional.
            if value < 0 or value != int(value):
                raise ValueError(f"{key}: a node's resources are whole numbers, got {value}")
        return self

    def capacity(self) -> Bundle:
        """What one node of this type offers to placement-group bundles."""
        return {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.custom}


class ClusterShape(_Model):
    node_types: list[NodeType] = Field(min_length=1)
    """The cluster's node types, in the order first-fit tries them."""

    @model_validator(mode="after")
    def _unique_names(self) -> ClusterShape:
        names = [t.name for t in self.node_types]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"node type names must be unique: {dupes}")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterShape:
        """Load and validate a shape file; errors name the field, like a config's."""
        try:
            return cls.model_validate(yaml.safe_load(Path(path).read_text()))
        except yaml.YAMLError as err:
            raise ConfigError(f"invalid shape {path}: {err}") from None
        except ValidationError as err:
            msg = format_validation_error(err).replace("invalid config", f"invalid shape {path}", 1)
            raise ConfigError(msg) from None

    def describe(self) -> str:
        """One line per node type: count and resources per node."""
        lines = []
        for t in self.node_types:
            count = "autoscaled" if t.count is None else f"x{t.count}"
            mem = f", {_num(t.memory_gib)} GiB" if t.memory_gib else ""
            lines.append(f"  {t.name} {count}: {fmt_bundle(_nonzero(t.capacity()))} per node{mem}")
        return "\n".join(lines)


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


def role_bundles(cfg: TrainConfig) -> list[tuple[str, Bundle, int]]:
    """(role, bundle, count) in the order `Roles` reserves them."""
    critic = cfg.active_critic  # None for critic-free estimators: nothing reserved
    return [
        ("policy", bundle(cfg.policy.resources), cfg.policy.num_ranks),
        *([("critic", bundle(critic.resources), critic.num_ranks)] if critic else []),
        ("reference", bundle(cfg.reference.resources), 1),
        ("reward", bundle(cfg.reward.resources), 1),
        ("rollout", bundle(cfg.rollout.resources), cfg.rollout.num_engines),
    ]


def cpus_needed(cfg: TrainConfig) -> float:
    """Logical CPUs that every role's bundles of a PPO run add up to."""
    return sum(b.get("CPU", 0.0) * n for _, b, n in role_bundles(cfg))


def plan_placement(cfg: TrainConfig, shape: ClusterShape) -> list[RolePlacement]:
    """Pack every role; raises PlacementError naming the first role that does not fit."""
    plan, error = _pack(cfg, shape)
    if error:
        raise PlacementError(error)
    return plan


def check_capacity(cfg: TrainConfig, shape: ClusterShape) -> None:
    """Raise PlacementError, naming the role and what it lacks, if the run cannot be placed."""
    plan_placement(cfg, shape)


def _pack(cfg: TrainConfig, shape: ClusterShape) -> tuple[list[RolePlacement], str | None]:
    roles = role_bundles(cfg)
    # An autoscaled type never needs more nodes than there are bundles.
    nodes = _instances(shape, cap=sum(n for _, _, n in roles))
    plan: list[RolePlacement] = []
    for role, b, n in roles:
        before = [_Node(x.label, x.kind, dict(x.free)) for x in nodes]
        labels = _place(nodes, b, n)
        if labels is None:
            return plan, _explain(role, b, n, before, shape, [p.role for p in plan])
        plan.append(RolePlacement(role, b, tuple(labels)))
    return plan, None


def _instances(shape: ClusterShape, cap: int) -> list[_Node]:
    out = []
    for t in shape.node_types:
        count = cap if t.count is None else t.count
        out += [_Node(f"{t.name}[{i}]", t.name, t.capacity()) for i in range(count)]
    return out


def _fits(free: Bundle, need: Bundle, times: int = 1) -> bool:
    return all(free.get(k, 0.0) + _EPS >= v * times for k, v in need.items() if v > 0)


def _take(free: Bundle, need: Bundle) -> None:
    for k, v in need.items():
        free[k] = free.get(k, 0.0) - v


def _place(nodes: list[_Node], b: Bundle, n: int) -> list[str] | None:
    """PACK: one node for all n bundles if any can; else first-fit. All or nothing, like Ray."""
    for node in nodes:
        if _fits(node.free, b, n):
            for _ in range(n):
                _take(node.free, b)
            return [node.label] * n
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
    missing = _ordered(k for k, v in b.items() if v > 0 and k not in offered)
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
    short = _ordered(k for k, v in b.items() if v * n > free[k] + _EPS)
    if short:
        need = ", ".join(f"{_num(b[k] * n)} {k}" for k in short)
        have = ", ".join(f"{_num(free[k])} {k}" for k in short)
        return (
            f"{head}, {need} in all (on one node if PACK can), but the {'/'.join(able)} "
            f"nodes that can hold one have {have} free{after}"
        )
    fit = sum(_how_many(x.free, b) for x in pool)
    room = ", ".join(f"{x.label} {fmt_bundle(_nonzero(x.free))}" for x in pool)
    return (
        f"{head}: enough in total, but the free space is split across nodes and only {fit} "
        f"bundles fit{after} (free: {room})"
    )


def _ordered(keys) -> list[str]:
    """CPU, GPU, then custom resource names sorted: the order every message uses."""
    keys = set(keys)
    return [k for k in ("CPU", "GPU") if k in keys] + sorted(keys - {"CPU", "GPU"})


def _shortfall(cap: Bundle, b: Bundle) -> str:
    short = _ordered(k for k, v in b.items() if cap.get(k, 0.0) + _EPS < v)
    return ", ".join(f"{k} {_num(cap.get(k, 0.0))}" for k in short)


def _how_many(free: Bundle, b: Bundle) -> int:
    counts = [int((free.get(k, 0.0) + _EPS) // v) for k, v in b.items() if v > 0]
    return min(counts) if counts else 0


def _nonzero(b: Bundle) -> Bundle:
    return {k: v for k, v in b.items() if v > _EPS}


def _num(x: float) -> str:
    return f"{x:g}"


def fmt_bundle(b: Bundle) -> str:
    """{CPU: 1, GPU: 4, rollout_node: 0.5}: CPU and GPU first, then custom names sorted."""
    return "{" + ", ".join(f"{k}: {_num(b[k])}" for k in _ordered(b)) + "}"


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


# ---- the live cluster -------------------------------------------------------------------------


def cluster_shape_from_ray() -> ClusterShape:
    """The connected cluster: alive nodes grouped by resources, plus autoscaler headroom."""
    import ray

    return shape_from_nodes(ray.nodes(), _autoscaler_groups())


def shape_from_nodes(nodes: list[dict], groups: list[tuple[str, Bundle, int]] = ()) -> ClusterShape:
    """Group `ray.nodes()` entries (alive only) into node types, then add for each autoscaler
    group (name, resources per node, max_count; -1 = unlimited) the nodes it may still add."""
    counts: Counter[tuple] = Counter()
    specs: dict[tuple, dict] = {}
    for node in nodes:
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        spec = _node_spec(res)
        key = (_HEAD_MARKER in res, _key(spec))
        specs.setdefault(key, spec)
        counts[key] += 1
    out = [_node_type(specs[k], c, "head" if k[0] else None) for k, c in counts.items()]
    live: Counter[tuple] = Counter()
    for (_, cap), c in counts.items():
        live[cap] += c
    for name, res, max_count in groups:
        spec = _node_spec(res)
        extra = None if max_count < 0 else max_count - live[_key(spec)]
        if extra is None or extra > 0:
            out.append(_node_type(spec, extra, f"{name} (autoscaler)"))
    return ClusterShape(node_types=_unique(out))


def _key(spec: dict) -> tuple:
    return tuple(sorted(spec["cap"].items()))


def _node_spec(res: dict[str, float]) -> dict:
    """Split a Ray resource dict: CPU/GPU/custom (what bundles take) and memory (shown only)."""
    skip = ("memory", "object_store_memory")
    cap = {k: float(v) for k, v in res.items() if not k.startswith("node:") and k not in skip}
    cap.setdefault("CPU", 0.0)
    mem = res.get("memory")
    return {"cap": cap, "memory_gib": round(mem / 2**30, 1) if mem else None}


def _node_type(spec: dict, count: int | None, name: str | None) -> NodeType:
    cap = dict(spec["cap"])
    cpu, gpu = cap.pop("CPU", 0.0), cap.pop("GPU", 0.0)
    # Name a worker type after its custom resources (trainer_node -> trainer_node), else its size.
    label = name or "+".join(k for k in sorted(cap) if ":" not in k) or f"{cpu:g}cpu-{gpu:g}gpu"
    mem = spec["memory_gib"] or None
    return NodeType(name=label, count=count, num_cpus=cpu, num_gpus=gpu, memory_gib=mem, custom=cap)


def _unique(types: list[NodeType]) -> list[NodeType]:
    seen: Counter[str] = Counter()
    for i, t in enumerate(types):
        seen[t.name] += 1
        if seen[t.name] > 1:
            types[i] = t.model_copy(update={"name": f"{t.name}-{seen[t.name]}"})
    return types


def _autoscaler_groups() -> list[tuple[str, Bundle, int]]:
    """Node groups an autoscaler reported to the GCS, if any (Ray's private state API)."""
    try:
        import ray._private.state as state

        config = state.state.get_cluster_config()
    except Exception:  # a private API: if it is gone or changed, no headroom is known
        return []
    if config is None:
        return []
    return [(g.name, dict(g.resources), g.max_count) for g in config.node_group_configs]


# ---- `rayrlhf check-placement` ------------------------------------------------------------------


def check_placement_main(config: str | None, overrides: list[str], cluster: str | None) -> int:
    """Print the per-role placement; 0 when placeable, 2 (with the reason) when not."""
    try:
        cfg = load_config(config, overrides)
        shape = ClusterShape.from_yaml(cluster) if cluster else _live_shape(cfg)
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
    print("\nplaceable: every role fits")
    return 0


def _live_shape(cfg: TrainConfig) -> ClusterShape:
    import ray

    address = cfg.ray_address or "auto"
    _probe(address)
    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    try:
        return cluster_shape_from_ray()
    finally:
        ray.shutdown()


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Raise ConnectionError unless a GCS answers: `ray.init` waits minutes on a dead address."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        resolved = canonicalize_bootstrap_address(address)
    except ImportError:  # a private helper; without it only an explicit host:port is probed
        resolved = None if address == "auto" else address
    except Exception as err:  # Ray's own "no cluster found" comes as several types
        raise ConnectionError(f"no Ray cluster for address {address!r}: {err}") from None
    hint = "start one, or check offline with --cluster deploy/cluster-shapes/<shape>.yaml"
    if not resolved:
        raise ConnectionError(f"no running Ray cluster found ({address!r}); {hint}")
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as err:
        raise ConnectionError(f"no Ray cluster answers at {resolved} ({err}); {hint}") from None
