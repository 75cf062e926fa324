"""The rollout engines of a run as a pool that heals and resizes itself.

Each engine has a placement group of its own (`ActorSet.start_engine`), so engines come and go
one at a time. The pool splits a batch over the engines that serve, and:

- an engine that dies or hangs (the adaptive `generate` limit, `cluster.waits.HangLimits`) is
  killed and removed; the rows it had are generated again by the others with the same seeds
  (row i always samples with seed + i, `workers.rollout`), so the batch is the one an
  unfaulted run draws. A new engine starts in its place; it serves once it has received the
  current weights with their bytes hashed against the trainer's (`WeightSync.sync`).
  `fault.max_engine_restarts` bounds the replacements, so a crash loop ends with one line.
- `resize(n)` (the `rayrlhf scale` request, read at a step boundary) starts or stops engines;
  no generate is in flight there, so a removed engine has nothing to drain. A new engine whose
  placement group is not placed within `placement_timeout_s` is given up with a message: the
  run goes on at its size, it never waits on the cluster inside a step.

Engines are admitted only at the start of a generate, where the policy's weights are the ones
the last sync delivered. With no engine left, the generate waits for the replacement.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from rayrlhf.cluster.actors import ActorSet
from rayrlhf.cluster.errors import RoleFailed
from rayrlhf.config import RolloutConfig
from rayrlhf.types import Sample, Timed

ROLE = "rollout"


@dataclass
class Joining:
    """An engine started but not serving yet: its constructor (or its placement) may still run."""

    actor: object
    index: int
    ready: object
    """The ref of its `__ray_ready__`, asked once at its start: a ref asked for at each look
    would never be answered within a zero-second wait."""
    started: float = field(default_factory=time.monotonic)


class EnginePool:
    """The engines that serve (`live`, in order), those joining, and the pool's counters.

    `make(index)` gives engine `index`'s constructor arguments; `sync` (set by `attach`) is the
    run's `WeightSync`, which must reach every serving engine after any change.
    """

    def __init__(
        self,
        actors: ActorSet,
        cls: type,
        ro: RolloutConfig,
        make: Callable[[int], tuple],
        max_restarts: int,
        restarts: int = 0,
    ) -> None:
        self.actors, self.cls, self.ro, self.make = actors, cls, ro, make
        self.max_restarts = max_restarts
        self.restarts = restarts
        """Engines replaced after a death or hang this launch (`rollout/engine_restarts`),
        carried over when the driver rebuilds every role."""
        self.regenerated_rows = 0
        """Rows generated again because their engine was lost mid-call."""
        self.target = ro.num_engines
        self.sync = None
        actors.start_engines(ROLE, cls, ro, make)
        self.live: list = list(actors.actors[ROLE])
        self.index = {id(a): i for i, a in enumerate(self.live)}
        self.joining: list[Joining] = []
        self._next = len(self.live)
        self._stale = False
        """`live` changed since the transport was last set up over it."""

    def attach(self, sync) -> None:
        """The run's `WeightSync`, built over `live` once every engine started."""
        self.sync = sync

    def sync_weights(self):
        """The step's weight sync over the engines that serve (`WeightSync.sync`). An engine
        lost on the way is replaced and the sync runs again over the others, its bytes hashed;
        the retries leave `verify_every`'s schedule as one sync would."""
        counted = True
        while True:
            if self._stale:
                self._set_up()
            try:
                return self.sync.sync(hash_bytes=None if counted else True, counted=counted)
            except RoleFailed as fault:
                self.lost(fault)  # re-raises unless an engine died or hung
                counted = False

    # ---- generate -------------------------------------------------------------------------

    def generate(
        self, prompt_ids: list[list[int]], seed: int, greedy: bool = False
    ) -> list[Timed[list[Sample]]]:
        """Row i of `prompt_ids` sampled with seed + i by some serving engine; the parts come
        back in the rows' order. Rows of a lost engine are generated again by the others."""
        self.admit(wait=not self.live)
        done: dict[int, Timed[list[Sample]]] = {}
        todo = [(0, len(prompt_ids))]
        while todo:
            calls = self._split(todo)
            refs = [e.generate.remote(prompt_ids[a:b], seed + a, greedy) for e, a, b in calls]
            lost = self._collect(refs, calls, done)
            todo = [(a, b) for e, a, b in calls if e in lost]
            self.regenerated_rows += sum(b - a for a, b in todo)
            if todo:
                self.admit(wait=not self.live)
        return [done[a] for a in sorted(done)]

    def _split(self, ranges: list[tuple[int, int]]) -> list[tuple[object, int, int]]:
        """(engine, first row, end row): each range split evenly over the serving engines."""
        m, out = len(self.live), []
        for a, b in ranges:
            bounds = [a + (b - a) * i // m for i in range(m + 1)]
            out += [(e, x, y) for e, x, y in zip(self.live, bounds, bounds[1:]) if y > x]
        return out

    def _collect(self, refs: list, calls: list, done: dict) -> set:
        """Wait for `refs` (one per call); returns the engines lost meanwhile, each replaced."""
        pending, lost = dict(zip(refs, calls)), set()
        while pending:
            try:
                outs = self.actors.get(list(pending), "generate")
            except RoleFailed as fault:
                engine = self.lost(fault)
                lost.add(engine)
                pending = {r: c for r, c in pending.items() if c[0] is not engine}
                continue
            for (_, a, _), out in zip(pending.values(), outs):
                done[a] = out
            pending = {}
        return lost

    # ---- failures and size ----------------------------------------------------------------

    def lost(self, fault: RoleFailed):
        """Remove the engine `fault` names and start its replacement, or re-raise `fault` when
        it is not an engine's death or hang, or the restart budget is spent."""
        if fault.role != ROLE or fault.rank < 0 or not fault.restartable:
            raise fault
        engine = self.actors.actors[ROLE][fault.rank]
        self.restarts += 1
        used = f"engine restart {self.restarts}/{self.max_restarts}"
        if self.restarts > self.max_restarts:
            f = fault
            cause = f"{f.cause}; no engine restart left ({self.max_restarts} used)"
            raise RoleFailed(f.role, f.rank, f.phase, f.kind, cause) from fault
        print(f"rayrlhf: rollout {self.index[id(engine)]} {fault.kind} during {fault.phase} "
              f"({fault.cause}); replacing it ({used})", flush=True)  # fmt: skip
        self._remove(engine)
        self._fill()
        return engine

    def resize(self, n: int) -> None:
        """Serve with `n` engines from the next generate. Called at a step boundary, where no
        generate is in flight: removed engines have nothing to drain, and new ones start and
        receive the weights now, so they take their share of the next batch. One that finds no
        room within placement_timeout_s is given up with a message."""
        if n == self.target:
            return
        print(f"rayrlhf: engines {self.target} -> {n} (rayrlhf scale)", flush=True)
        self.target = n
        while len(self.live) + len(self.joining) > n:
            if self.joining:  # one not serving yet goes first
                self.actors.release_one(ROLE, self.joining.pop().actor)
            else:
                self._remove(self.live[-1])
        if len(self.live) + len(self.joining) < n:
            self._fill()
            self.admit(wait=True, every=True)
        else:
            self._resync()

    def _remove(self, engine) -> None:
        self.live = [e for e in self.live if e is not engine]
        self._stale = True
        self.actors.release_one(ROLE, engine)

    def _fill(self) -> None:
        """Start engines until serving + joining reaches the target; they join in `admit`."""
        while len(self.live) + len(self.joining) < self.target:
            i, self._next = self._next, self._next + 1
            actor = self.actors.start_engine(
                ROLE, self.cls, self.ro, self.make(i), f"{ROLE}-{i}", wait=False
            )
            self.index[id(actor)] = i
            self.joining.append(Joining(actor, i, actor.__ray_ready__.remote()))

    def admit(self, wait: bool = False, every: bool = False) -> None:
        """Engines whose start finished serve from now on, once the weights reached them. With
        `wait`, block until one serves (`every`: until none is joining), each start bounded by
        placement_timeout_s for its group and phase_timeout_s for its constructor. A joining
        engine that fails or hangs in its start counts as a restart (and is replaced); one
        whose group is not placed in time is dropped. Raises RoleFailed when, waiting, no
        engine is left to serve."""
        while True:
            if wait:
                self._await(every)
            ready = self._started()
            if ready:
                self.live += ready
                self._resync()
                for e in ready:
                    print(f"rayrlhf: engine {self.index[id(e)]} serves (weights synced and "
                          f"verified); {len(self.live)} serving", flush=True)  # fmt: skip
            if not wait or (self.live and not (every and self.joining)):
                return
            if not self.joining:
                raise RoleFailed(ROLE, -1, "generate", "died", "no engine could start or be placed")

    def _await(self, every: bool) -> None:
        limit = self.actors.placement_timeout
        for j in list(self.joining):
            if not self.actors.placed(ROLE, j.actor, j.started + limit - time.monotonic()):
                self._give_up(j)
        refs = [j.ready for j in self.joining]
        if refs:
            n = len(refs) if every else 1
            ray.wait(refs, num_returns=n, timeout=self.actors.timeout)

    def _started(self) -> list:
        """The joining engines whose constructors returned; those that raised are replaced,
        those whose group found no room in time are given up."""
        refs = {j.ready: j for j in self.joining}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        out = []
        for ref in ready:
            j = refs[ref]
            self.joining.remove(j)
            try:
                self.actors.get(ref, "engine start-up")
                out.append(j.actor)
            except RoleFailed as fault:
                self.live.append(j.actor)  # `lost` takes it out again and replaces it
                self.lost(fault)
        limit = self.actors.placement_timeout
        for j in [j for j in self.joining if time.monotonic() - j.started > limit]:
            if not self.actors.placed(ROLE, j.actor):
                self._give_up(j)
            elif time.monotonic() - j.started > limit + self.actors.timeout:
                self.joining.remove(j)  # placed, but its constructor never returned
                self.live.append(j.actor)  # `lost` takes it out again and replaces it
                rank = self._rank(j.actor)
                self.lost(RoleFailed(ROLE, rank, "engine start-up", "hung", "it never started"))
        return out

    def _rank(self, actor) -> int:
        """`actor`'s position in the ActorSet's list of engines (what `RoleFailed.rank` says)."""
        return next(i for i, a in enumerate(self.actors.actors[ROLE]) if a is actor)

    def _give_up(self, j: Joining) -> None:
        limit = self.actors.placement_timeout
        free = {k: v for k, v in ray.available_resources().items() if "_group_" not in k}
        print(f"rayrlhf: engine {j.index} found no room on the cluster within {limit:.0f}s "
              f"(free: {free}; a local run has room for rollout.max_engines); going on with "
              f"{len(self.live)}", flush=True)  # fmt: skip
        self.joining.remove(j)
        self.actors.release_one(ROLE, j.actor)
        self.target -= 1

    def _resync(self) -> None:
        """Set the transport up over the serving engines and push the current weights to them,
        their bytes hashed (a newcomer's fingerprint checked before it generates). An engine
        lost on the way is replaced and the push runs again over the others."""
        while self.sync is not None:
            self._set_up()
            try:
                self.sync.sync(hash_bytes=True, counted=False)
                return
            except RoleFailed as fault:
                self.lost(fault)

    def _set_up(self) -> None:
        """`WeightSync.set_engines` over `live`, with the nodes of the policy and of `live`."""
        from ray.util.placement_group import placement_group_table

        groups = self.actors.groups
        pgs = groups.get("policy", []) + [groups[ROLE][self._rank(e)] for e in self.live]
        nodes = {n for pg in pgs for n in placement_group_table(pg)["bundles_to_node_id"].values()}
        self.sync.set_engines(self.live, nodes)
        self._stale = False


def pool_record(pool: EnginePool, tokens: dict[int, int]) -> dict[str, float]:
    """The step's pool metrics: engines serving, replacements so far, and the response tokens
    each engine generated this step (`rollout/engine_tokens/<index>`)."""
    rec = {"rollout/engines_alive": len(pool.live), "rollout/engine_restarts": pool.restarts}
    return rec | {f"rollout/engine_tokens/{i}": n for i, n in sorted(tokens.items())}
