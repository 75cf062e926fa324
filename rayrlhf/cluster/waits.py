"""Bounded waits on actors: a stuck phase becomes an error that names it, never a silent hang."""

from __future__ import annotations

import ray


def bounded_get(refs, timeout: float, phase: str):
    """`ray.get` that raises TimeoutError naming `phase` after `timeout` seconds."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(
            f"phase '{phase}' did not finish within {timeout}s "
            "(raise phase_timeout_s if the model is that slow)"
        ) from None
