"""Every actor and placement group of a run, held in one place so that any failure frees them.

A recipe opens an `ActorSet` before it reserves anything and closes it however the run ends:

    with ActorSet(cfg.phase_timeout_s, cfg.placement_timeout_s) as actors:
        policy = actors.start_zero3("policy", PolicyWorker, cfg.policy, accum, cfg.seed)
        reward = actors.start_one("reward", RewardWorker, cfg.reward.resources, ...)
        actors.wait_ready()
        ...

Each role is registered the moment its group is reserved and each actor the moment it is
created, so a placement time-out for the third role still kills the first two roles' actors.
Every wait goes through `get`, bounded by the phase time-out.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group

from rayrlhf.cluster.placement import (
    actor_options,
    engine_actor_options,
    engine_layout,
    reserve,
    start_zero3_ranks,
)
from rayrlhf.cluster.waits import HangLimits, get_named, sweep_abandoned
from rayrlhf.config import RankGroupConfig, Resources, RolloutConfig


class ActorSet:
    """The actors of one run, by role, with their placement groups."""

    def __init__(
        self, phase_timeout_s: float, placement_timeout_s: float, hangs: HangLimits | None = None
    ) -> None:
        self.timeout = phase_timeout_s
        self.placement_timeout = placement_timeout_s
        self.hangs = hangs or HangLimits(phase_timeout_s)
        """Each phase's wait limit (fixed at phase_timeout_s unless adaptive)."""
        self.abandoned: list = []
        """Calls left running by a failed wait (`get_named`), fetched by later waits."""
        self.groups: dict[str, list[PlacementGroup]] = {}
        """Each role's placement groups: one, or one per engine (index i: engine i's)."""
        self.actors: dict[str, list] = {}

    def __enter__(self) -> ActorSet:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def get(self, refs, phase: str):
        """`ray.get` bounded by the phase's limit; a dead, hung or raising actor is a
        `RoleFailed` naming its role and rank (`waits.get_named`)."""
        return get_named(refs, phase, self.hangs, self.name_of, self.abandoned)

    def name_of(self, actor_id: str | None) -> tuple[str, int]:
        """(role, rank) of the actor with this id hex (rank: its index within the role)."""
        for role, actors in self.actors.items():
            for rank, actor in enumerate(actors):
                if actor._actor_id.hex() == actor_id:
                    return role, rank
        return "an actor", -1

    def reserve(
        self,
        role: str,
        res: Resources,
        count: int,
        strategy: str = "PACK",
        name: str = "",
        wait: bool = True,
    ) -> PlacementGroup:
        """`count` bundles for `role`, in a placement group of its own (named `name`, else
        after the role); with `wait` False the group is placed whenever the cluster has room."""
        timeout = self.placement_timeout if wait else None
        pg = reserve(name or role, res, count, timeout, strategy)
        self.groups.setdefault(role, []).append(pg)
        self.actors.setdefault(role, [])
        return pg

    def start(
        self, role: str, cls: type, res: Resources, count: int, args: Callable[[int], tuple]
    ) -> list:
        """`count` actors of `cls`, actor i built with `args(i)`, one per bundle of `role`."""
        pg = self.reserve(role, res, count)
        for i in range(count):
            actor = ray.remote(cls).options(**actor_options(pg, i, res)).remote(*args(i))
            self.actors[role].append(actor)
        return self.actors[role]

    def start_one(self, role: str, cls: type, res: Resources, *args):
        """A single actor of `cls(*args)` for `role`."""
        return self.start(role, cls, res, 1, lambda _: args)[0]

    def start_engines(
        self, role: str, cls: type, ro: RolloutConfig, args: Callable[[int], tuple]
    ) -> list:
        """`ro.num_engines` engine actors, engine i built with `args(i)` (`start_engine`)."""
        for i in range(ro.num_engines):
            self.start_engine(role, cls, ro, args(i), f"{role}-{i}")
        return self.actors[role]

    def start_engine(
        self, role: str, cls: type, ro: RolloutConfig, args: tuple, name: str, wait: bool = True
    ):
        """One engine actor `cls(*args)` in a placement group of its own (named `name`), placed
        as `engine_layout` says: one bundle holding the engine, or tensor_parallel_size
        single-GPU bundles with the actor in bundle 0. Appended to `role`'s actors. With `wait`
        False the actor starts once its group is placed (see `placed`)."""
        layout = engine_layout(ro)
        pg = self.reserve(role, ro.resources, layout.bundles, layout.strategy, name, wait)
        if layout.bundles == 1:
            options = actor_options(pg, 0, ro.resources)
        else:
            options = engine_actor_options(pg, ro.resources)
        actor = ray.remote(cls).options(**options).remote(*args)
        self.actors[role].append(actor)
        return actor

    def release_one(self, role: str, actor) -> None:
        """Kill one actor of a role whose actors each have a group of their own (the engines)
        and free its group."""
        i = next(i for i, a in enumerate(self.actors[role]) if a is actor)
        ray.kill(self.actors[role].pop(i))
        remove_placement_group(self.groups[role].pop(i))

    def placed(self, role: str, actor, timeout: float = 0) -> bool:
        """Whether the placement group of `actor` (of a role with a group per actor) is placed,
        waiting up to `timeout` seconds for it."""
        from ray.util.placement_group import placement_group_table

        i = next(i for i, a in enumerate(self.actors[role]) if a is actor)
        pg = self.groups[role][i]
        if timeout <= 0:  # the table, not `pg.ready()`: a fresh ref is never ready at once
            return placement_group_table(pg)["state"] == "CREATED"
        ready, _ = ray.wait([pg.ready()], timeout=timeout)
        return bool(ready)

    def nodes(self, *roles: str) -> set[str]:
        """The Ray node ids that `roles`' reserved bundles are on."""
        from ray.util.placement_group import placement_group_table

        pgs = [pg for role in roles for pg in self.groups.get(role, [])]
        return {n for pg in pgs for n in placement_group_table(pg)["bundles_to_node_id"].values()}

    def start_zero3(
        self, role: str, cls: type, group: RankGroupConfig, grad_accum_steps: int, seed: int
    ) -> list:
        """The `group.num_ranks` ZeRO-3 rank actors of `role` (see `start_zero3_ranks`)."""
        pg = self.reserve(role, group.resources, group.num_ranks)
        ranks = start_zero3_ranks(cls, pg, group, grad_accum_steps, seed, self.timeout)
        self.actors[role] = ranks
        return self.actors[role]

    def all(self) -> list:
        return [a for actors in self.actors.values() for a in actors]

    def wait_ready(self) -> None:
        """Wait for every constructor (they run concurrently). The first actor that fails to
        start raises at once, though others still wait for it (e.g. at a rendezvous)."""
        pending = {
            a.__ray_ready__.remote(): role for role, acts in self.actors.items() for a in acts
        }
        deadline = time.monotonic() + self.timeout
        while pending:
            left = max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            if not ready:
                roles = ", ".join(sorted(set(pending.values())))
                raise TimeoutError(
                    f"phase 'start-up' did not finish within {self.timeout}s (still starting: "
                    f"{roles}; raise phase_timeout_s if the models are that slow to load)"
                )
            pending.pop(ready[0])
            ray.get(ready[0])  # the actor's start-up error, if it had one

    def release(self, role: str) -> None:
        """Kill `role`'s actors and free its bundles."""
        for actor in self.actors.pop(role, []):
            ray.kill(actor)
        for pg in self.groups.pop(role, []):
            remove_placement_group(pg)

    def shutdown(self) -> None:
        """Release every role; safe to call twice. The calls abandoned by a failed wait end
        with their actors, and are fetched, so that Ray prints none as an unhandled error."""
        for role in [*self.actors, *self.groups]:
            self.release(role)
        sweep_abandoned(self.abandoned, timeout=2.0)
