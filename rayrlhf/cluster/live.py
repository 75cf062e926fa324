"""The live cluster's shape: its alive nodes grouped by resources, plus what an autoscaler
reports it may still add; and connecting to it, with a probe that fails fast on a dead address.
A live cluster does not report its GPUs' memory, so the memory plan leaves its roles unchecked
(`NodeType.gpu_memory_gib`); check a recipe offline against a shape file for that."""

from __future__ import annotations

import socket
from collections import Counter

from rayrlhf.cluster.shape import Bundle, ClusterShape, NodeType
from rayrlhf.config import TrainConfig

_HEAD_MARKER = "node:__internal_head__"


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


def live_shape(cfg: TrainConfig) -> ClusterShape:
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
