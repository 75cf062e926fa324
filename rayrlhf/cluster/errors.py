"""The error of a failed actor, importable without Ray (the CLI catches it, `--help` stays fast)."""

from __future__ import annotations

FailureKind = str
"""'died' (the actor's process is gone), 'hung' (no answer within the phase's limit) or 'failed'
(the actor's method raised)."""


class RoleFailed(RuntimeError):
    """An actor of `role` (rank `rank` within it) died, hung or raised during `phase`.

    An actor that waits on actors of another role (the reward actor on the judge's engines)
    raises it naming them; it reaches the driver inside Ray's error, and the driver's wait
    names that role, not the one that relayed it (`waits.get_named`)."""

    def __init__(self, role: str, rank: int, phase: str, kind: FailureKind, cause: str) -> None:
        super().__init__(f"{role} {rank} {kind} during {phase} ({cause})")
        self.role, self.rank, self.phase, self.kind, self.cause = role, rank, phase, kind, cause

    def __reduce__(self):
        # Rebuilt from its fields: Ray pickles it when an actor relays it to the driver.
        return type(self), (self.role, self.rank, self.phase, self.kind, self.cause)

    @property
    def restartable(self) -> bool:
        """A lost or stuck process may work when started again; a method that raised would
        raise again (a bug or bad input), so a restart would only repeat it."""
        return self.kind in ("died", "hung")
