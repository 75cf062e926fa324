"""Resource groups: one Ray placement group per role, one bundle per actor of the role, except
the rollout engines: one group per engine (`engine_layout`), so that engines can be replaced,
added and removed one at a time (Ray cannot grow or shrink a placement group).

On a GPU cluster a bundle holds the role's GPUs; on CPU it holds logical CPUs, so each role still
gets its own reservation and its actors never compete for another role's slot. Reservation is
bounded in time: an unplaceable request is an error naming the role and what it asked for.
Also here: joining or starting the cluster, and starting a ZeRO-3 group's ranks in their bundles,
which every recipe (PPO, DPO, SFT, reward model) does the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
from ray._private import ray_constants
from ray._private.authentication.authentication_token_generator import (
    generate_new_authentication_token,
)
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayrlhf.cluster.rendezvous import free_port
from rayrlhf.cluster.waits import bounded_get
from rayrlhf.config import RankGroupConfig, Resources, RolloutConfig


class PlacementError(RuntimeError):
    """A role's resources cannot be reserved on this cluster."""


def bundle(res: Resources) -> dict[str, float]:
    """One actor's reservation as a Ray bundle."""
    out = {"CPU": res.num_cpus, **res.custom}
    if res.num_gpus:
        out["GPU"] = res.num_gpus
    return out


def reserve(
    role: str,
    res: Resources,
    count: int,
    timeout_s: float | None = 60.0,
    strategy: str = "PACK",
) -> PlacementGroup:
    """Reserve `count` bundles for `role`, or raise PlacementError within `timeout_s`; None
    returns the group at once, to be placed whenever the cluster has room."""
    pg = placement_group([bundle(res)] * count, strategy=strategy, name=f"rayrlhf-{role}")
    if timeout_s is None:
        return pg
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise PlacementError(
            f"{role}: could not reserve {count} x {bundle(res)} ({strategy}) within "
            f"{timeout_s:.0f}s; free on the cluster: {ray.available_resources()}"
        )
    return pg


@dataclass(frozen=True)
class EngineLayout:
    """How the rollout engines are reserved: `groups` placement groups of `bundles` bundles
    each, every bundle `rollout.resources`.

    Tensor parallel size 1: one group of one bundle per engine, the engine actor holding the
    bundle's GPU (vLLM then runs in the actor). TP > 1: each engine its own group of TP
    single-GPU bundles on one node (STRICT_PACK), the engine actor in bundle 0 with no GPU of
    its own: inside a placement group vLLM picks its Ray executor, which starts one worker per
    GPU bundle of the actor's group and refuses a bundle of more than one GPU. Each worker is a
    Ray actor, so every transport reaches it: it joins the broadcast group, reads the object
    store, maps /dev/shm on its node."""

    groups: int
    bundles: int
    strategy: str


def engine_layout(ro: RolloutConfig) -> EngineLayout:
    """The engines' placement, or PlacementError for one vLLM cannot start."""
    tp = ro.tensor_parallel_size
    if tp == 1:
        return EngineLayout(ro.num_engines, 1, "PACK")
    gpus = ro.resources.num_gpus
    if gpus != 1:
        raise PlacementError(
            f"rollout: tensor_parallel_size {tp} puts each engine in {tp} bundles of "
            f"rollout.resources, one per GPU worker, and vLLM's Ray executor needs exactly one "
            f"GPU in each (it refuses a bundle of more than one); rollout.resources asks for "
            f"{gpus:g} GPUs: set rollout.resources.num_gpus to 1, and its CPUs and custom "
            "resources to one GPU's share"
        )
    return EngineLayout(ro.num_engines, tp, "STRICT_PACK")


def engine_actor_options(pg: PlacementGroup, res: Resources) -> dict:
    """`.options(...)` for a TP > 1 engine actor: bundle 0 of its own group, the bundle's CPUs
    and custom resources but none of its GPU (vLLM's bundle-0 worker takes it), and the group
    captured so that vLLM, inside the actor, finds it as the current placement group."""
    return {
        "num_cpus": res.num_cpus,
        "num_gpus": 0,
        "resources": dict(res.custom) or None,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg,
            placement_group_bundle_index=0,
            placement_group_capture_child_tasks=True,
        ),
    }


def vllm_executor_backend(tensor_parallel_size: int) -> str | None:
    """`distributed_executor_backend` for an engine placed by `engine_layout`: 'ray' for TP > 1
    (vLLM's own choice inside a placement group, but vLLM first checks that the actor sees TP
    GPUs, which a 0-GPU engine actor does not, unless the backend is given); None (vLLM's
    in-process executor) for TP 1."""
    return "ray" if tensor_parallel_size > 1 else None


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
    """torch threads for an actor: `res.num_threads`, else its bundle's CPUs."""
    return res.num_threads or max(1, int(res.num_cpus))


def node_address_and_port() -> tuple[str, int]:
    """This process's node IP and a free port there: a rendezvous that this process hosts."""
    ip = ray.util.get_node_ip_address()
    return ip, free_port(ip)


@ray.remote(num_cpus=0)
def address_and_port() -> tuple[str, int]:
    """Run inside a role's bundle (pin it there: unpinned, it runs on the caller's node): the
    node's IP and a free port there (rank 0's rendezvous)."""
    return node_address_and_port()


# Ray 2.60 swaps a loopback node address for the machine's own, even one given explicitly
# (services.resolve_ip_for_localhost), and its servers then listen on all interfaces. In its
# single-machine mode (meant for macOS and Windows) the node address stays 127.0.0.1 and every
# server, gRPC, HTTP and metrics alike, binds loopback only.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@contextmanager
def loopback_only() -> Iterator[None]:
    """Ray's single-machine mode for the Ray processes started inside: they inherit the
    environment; this process read the flag when it imported ray, so it is set here too. Both
    are restored on exit, so that a later `ray start` from this process can still join nodes."""
    saved_env = {k: os.environ.get(k) for k in LOOPBACK_ENV}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(LOOPBACK_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def private_token(path: Path) -> None:
    """Make Ray's auth token file `path` mode 600. A local ray.init writes it with the umask's
    mode (0644 under 022), readable by every user of the machine, and the token lets its holder
    run code on the cluster. Where ray.init is about to generate one (token mode, no token given),
    write it here first, mode 600 (Ray reuses it); a file left wider is tightened."""
    given = {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & os.environ.keys()
    if os.environ.get("RAY_AUTH_MODE", "token").lower() == "token" and not given:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(generate_new_authentication_token())
    if path.exists() and path.stat().st_mode & 0o077:
        path.chmod(0o600)


def start_ray(address: str | None, cpus_needed: float) -> None:
    """Join `address`, the Ray job's cluster, or start a local one with a logical CPU for each
    bundle (more than the cores if need be: each role still gets its own reservation). The
    local one listens on loopback only and its token file is mode 600."""
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(address=address or "auto")
        return
    token = Path.home() / ".ray" / "auth_token"
    private_token(token)
    with loopback_only():
        ray.init(
            num_cpus=max(int(cpus_needed + 0.999), os.cpu_count() or 1), include_dashboard=False
        )
    private_token(token)


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
