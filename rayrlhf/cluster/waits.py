"""Bounded waits on actors: a stuck phase becomes an error that names it, never a silent hang;
a dead, hung or failing actor becomes a `RoleFailed` that names its role and rank. An actor that
waits on another role's actors (the reward actor on the judge's engines) relays their failure as
a `RoleFailed` of theirs, which the driver reports as it is (`failure_of`).

A phase's limit adapts to the run (`HangLimits`): once a phase has completed `warmup` times, a
wait on it may last `factor` times its slowest completed wait (never under `min_s`, never over
the fixed `max_s`), so a stopped engine is found in about a minute, not after 900 s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray

from rayrlhf.cluster.errors import FailureKind, RoleFailed


@dataclass
class HangLimits:
    """Per-phase wait limits, adapting to each phase's measured time (see the module doc)."""

    max_s: float
    """The fixed limit (phase_timeout_s): always the ceiling, and the limit until warm-up."""
    factor: float = 0.0
    """Multiple of a phase's slowest completed wait; 0 keeps every limit at max_s."""
    min_s: float = 60.0
    """The adapted limit is never below this."""
    warmup: int = 2
    """Completed waits of a phase before its limit adapts."""
    seen: dict[str, list[float]] = field(default_factory=dict)
    """Each phase's completed waits: [count, slowest seconds]."""

    def limit(self, phase: str) -> float:
        count, slowest = self.seen.get(phase, (0, 0.0))
        if not self.factor or count < self.warmup:
            return self.max_s
        return min(self.max_s, max(self.min_s, self.factor * slowest))

    def observe(self, phase: str, seconds: float) -> None:
        count, slowest = self.seen.get(phase, (0, 0.0))
        self.seen[phase] = [count + 1, max(slowest, seconds)]


def bounded_get(refs, timeout: float, phase: str):
    """`ray.get` that raises TimeoutError naming `phase` after `timeout` seconds."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(
            f"phase '{phase}' did not finish within {timeout}s "
            "(raise phase_timeout_s if the model is that slow)"
        ) from None


def sweep_abandoned(abandoned: list, timeout: float = 0.0) -> None:
    """Fetch and forget the `abandoned` calls (see `get_named`) that have finished, waiting at
    most `timeout` seconds for them."""
    if abandoned:
        ready, abandoned[:] = ray.wait(abandoned, num_returns=len(abandoned), timeout=timeout)
        for ref in ready:
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayError:
                pass


def get_named(refs, phase: str, limits: HangLimits, name_of, abandoned: list | None = None):
    """`ray.get(refs)` within `limits.limit(phase)`; a dead, hung or raising actor becomes a
    `RoleFailed` naming it (`name_of(actor_id_hex)` -> (role, rank)), with Ray's error chained.

    The calls still running when it fails (e.g. a broken collective's survivors) go to
    `abandoned`, fetched quietly by later waits (`sweep_abandoned`): their errors echo the one
    named, and Ray prints every error never fetched as an "Unhandled error" with a traceback."""
    sweep_abandoned(abandoned or [])
    limit, start = limits.limit(phase), time.monotonic()
    try:
        out = ray.get(refs, timeout=limit)
    except ray.exceptions.GetTimeoutError:
        waiting = _pending(refs)
        if abandoned is not None:
            abandoned.extend(waiting)
        role, rank = name_of(_actor_of(waiting[0])) if waiting else ("an actor", -1)
        slowest = limits.seen.get(phase, (0, 0.0))[1]
        cause = f"no answer in {limit:.0f}s" + (
            f"; its slowest {phase} so far took {slowest:.1f}s" if limit < limits.max_s else ""
        )
        raise RoleFailed(role, rank, phase, "hung", cause) from None
    except ray.exceptions.RayError as err:
        fault = named_failure(refs, err, phase, name_of)  # waits a moment for a death
        if abandoned is not None:
            abandoned.extend(_pending(refs))
        raise fault  # noqa: B904 (its cause is the culprit's error, set by `failure_of`)
    limits.observe(phase, time.monotonic() - start)
    return out


def named_failure(refs, err: Exception, phase: str, name_of) -> RoleFailed:
    """The `RoleFailed` for `err`, raised by `ray.get(refs)`: the actor to blame (`_culprit`),
    named by `name_of`, with its Ray error as the cause (`failure_of`)."""
    ref, first = _culprit(refs, err)
    role, rank = name_of(_actor_of(ref)) if ref is not None else ("an actor", -1)
    return failure_of(role, rank, phase, first)


def failure_of(role: str, rank: int, phase: str, err: Exception) -> RoleFailed:
    """`role` `rank` failed with Ray error `err` during `phase`; but if its method raised a
    `RoleFailed` about an actor it waited on (the reward actor on a judge engine), that one:
    the relaying actor is not the cause."""
    relayed = getattr(err, "cause", None)
    if isinstance(relayed, RoleFailed):
        fault = RoleFailed(relayed.role, relayed.rank, phase, relayed.kind, relayed.cause)
    else:
        fault = RoleFailed(role, rank, phase, *_describe(err))
    fault.__cause__ = err
    return fault


def _as_list(refs) -> list:
    return list(refs) if isinstance(refs, list | tuple) else [refs]


def _pending(refs) -> list:
    refs = _as_list(refs)
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
    return pending


def _actor_of(ref) -> str | None:
    actor = ref.task_id().actor_id()
    return None if actor.is_nil() else actor.hex()


DEATH_GRACE_S = 10.0
"""How long a raised error waits for a death among the other calls: a member of a collective
whose peer was killed raises at once (a closed connection), and Ray reports the death later."""


def _culprit(refs, err: Exception):
    """The ref whose error to report, and that error: a dead actor before one that raised,
    since a rank whose peer died usually fails too (a broken collective) and is not the cause.
    `ray.get` raises at the first error, so the calls still running get `DEATH_GRACE_S`."""
    refs = _as_list(refs)
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
    found = _errors([r for r in refs if r not in pending])
    deadline = time.monotonic() + DEATH_GRACE_S
    while pending and not _deaths(found) and time.monotonic() < deadline:
        ready, pending = ray.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        found += _errors(ready)
    return (_deaths(found) or found or [(None, err)])[0]


def _errors(ready: list) -> list:
    """(ref, error) for each of the finished `ready` refs that holds an error."""
    found = []
    for ref in ready:
        try:
            ray.get(ref, timeout=0)
        except ray.exceptions.RayError as e:
            found.append((ref, e))
    return found


def _deaths(found: list) -> list:
    return [f for f in found if isinstance(f[1], ray.exceptions.RayActorError)]


def _describe(err: Exception) -> tuple[FailureKind, str]:
    if isinstance(err, ray.exceptions.RayActorError):
        return "died", "its process exited" if "died" in str(err) else str(err).splitlines()[0]
    cause = getattr(err, "cause", None) or err
    last = (str(cause).strip().splitlines() or [""])[-1][:200]
    return "failed", f"{type(cause).__name__}: {last}" if last else type(cause).__name__
