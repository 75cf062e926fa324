"""A stuck phase is an error naming it, not a hang (real Ray, local, loopback only)."""

from __future__ import annotations

import time

import pytest
import ray

from rayrlhf.cluster.waits import bounded_get


@ray.remote(num_cpus=0)
def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_bounded_get_names_the_stuck_phase_and_returns_in_time():
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        assert bounded_get(_sleep.remote(0.0), 30, "fast") == 0.0
        start = time.perf_counter()
        with pytest.raises(TimeoutError, match="phase 'sync' did not finish within 1"):
            bounded_get([_sleep.remote(60.0)], 1, "sync")
        assert time.perf_counter() - start < 10
    finally:
        ray.shutdown()
