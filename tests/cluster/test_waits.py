"""A stuck phase is an error naming it, not a hang (real Ray, local, loopback only)."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
import types

import pytest
import ray

from rayrlhf.cluster.waits import HangLimits, RoleFailed, bounded_get, failure_of, get_named
from rayrlhf.config import JudgeConfig, RewardConfig
from rayrlhf.workers.reward import RewardWorker


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


def test_hang_limits_adapt_after_warmup_within_floor_and_ceiling():
    limits = HangLimits(max_s=900, factor=10, min_s=60, warmup=2)
    assert limits.limit("generate") == 900  # nothing measured yet
    limits.observe("generate", 3.0)
    assert limits.limit("generate") == 900  # one run is no warm-up
    limits.observe("generate", 2.0)
    assert limits.limit("generate") == 60  # 10 x 3 s, raised to the floor
    limits.observe("generate", 20.0)
    assert limits.limit("generate") == 200  # 10 x the slowest
    limits.observe("generate", 500.0)
    assert limits.limit("generate") == 900  # never above the fixed limit
    assert limits.limit("sync") == 900  # phases adapt separately
    assert HangLimits(max_s=900).limit("generate") == 900  # factor 0: fixed


@ray.remote(num_cpus=0)
class _Worker:
    def pid(self) -> int:
        return os.getpid()

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)

    def boom(self) -> None:
        raise ValueError("the reward rule returned a string")

    def boom_after(self, seconds: float) -> None:
        time.sleep(seconds)
        raise RuntimeError("Connection closed by peer")


def test_get_named_names_the_dead_hung_or_raising_actor():
    """Three actors of two roles: each failure names the right role and rank, within a second
    of the cause (death, the adapted limit), and keeps Ray's error as the cause."""
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        roles = {"policy": [_Worker.remote(), _Worker.remote()], "reward": [_Worker.remote()]}
        pids = {a: ray.get(a.pid.remote()) for acts in roles.values() for a in acts}
        ids = {a._actor_id.hex(): (r, i) for r, acts in roles.items() for i, a in enumerate(acts)}
        limits = HangLimits(max_s=60, factor=2, min_s=1, warmup=1)
        get = lambda refs, phase: get_named(refs, phase, limits, lambda h: ids[h])  # noqa: E731

        with pytest.raises(RoleFailed) as err:
            get(roles["reward"][0].boom.remote(), "score")
        f = err.value
        assert (f.role, f.rank, f.phase, f.kind) == ("reward", 0, "score", "failed")
        assert "ValueError: the reward rule returned a string" in f.cause and not f.restartable

        get([a.wait.remote(0.2) for a in roles["policy"]], "train")  # warm-up: 0.2 s measured
        assert limits.limit("train") == 1.0  # max(min_s, 2 x 0.2)
        start = time.monotonic()
        with pytest.raises(RoleFailed) as err:
            get([roles["policy"][0].wait.remote(0), roles["policy"][1].wait.remote(30)], "train")
        assert time.monotonic() - start < 5
        f = err.value
        assert (f.role, f.rank, f.kind) == ("policy", 1, "hung") and f.restartable
        assert "no answer in 1s" in f.cause

        refs = [a.wait.remote(30) for a in roles["policy"]]
        time.sleep(0.5)
        os.kill(pids[roles["policy"][1]], signal.SIGKILL)
        with pytest.raises(RoleFailed) as err:
            get_named(refs, "sync", HangLimits(60), lambda h: ids[h])
        f = err.value
        assert (f.role, f.rank, f.phase, f.kind) == ("policy", 1, "sync", "died")
        assert isinstance(f.__cause__, ray.exceptions.RayActorError)

        # A collective's survivor raises at once when its peer is killed, and Ray reports the
        # death after that: the dead peer is named, not the survivor that raised first.
        roles["rollout"] = [_Worker.remote()]
        (peer,) = roles["rollout"]
        ids[peer._actor_id.hex()] = ("rollout", 0)
        killer = threading.Timer(1.0, os.kill, (ray.get(peer.pid.remote()), signal.SIGKILL))
        refs = [roles["reward"][0].boom.remote(), peer.wait.remote(30)]
        killer.start()
        with pytest.raises(RoleFailed) as err:
            get_named(refs, "sync", HangLimits(60), lambda h: ids[h])
        f = err.value
        assert (f.role, f.rank, f.kind) == ("rollout", 0, "died") and f.restartable

        # The death named at once, the survivor's later error is its echo: kept in `abandoned`
        # and fetched by the next wait, so that Ray never prints it as an unhandled error.
        dying, survivor = _Worker.remote(), _Worker.remote()
        ids |= {dying._actor_id.hex(): ("rollout", 1), survivor._actor_id.hex(): ("policy", 2)}
        killer = threading.Timer(0.5, os.kill, (ray.get(dying.pid.remote()), signal.SIGKILL))
        abandoned, refs = [], [dying.wait.remote(30), survivor.boom_after.remote(2.0)]
        killer.start()
        with pytest.raises(RoleFailed) as err:
            get_named(refs, "sync", HangLimits(60), lambda h: ids[h], abandoned)
        assert err.value.role == "rollout" and abandoned == [refs[1]]
        time.sleep(2.5)
        get_named(survivor.pid.remote(), "sync", HangLimits(60), lambda h: ids[h], abandoned)
        assert abandoned == []  # fetched: its error will not be printed
    finally:
        ray.shutdown()


def test_a_relayed_role_failure_names_the_actor_that_failed_not_the_relay():
    """An actor's method that raised a RoleFailed about an actor it waited on: the driver names
    that one (with its own phase), and the fault survives the pickling Ray gives it."""
    judge = RoleFailed("judge", 1, "judge", "died", "its process exited")
    again = pickle.loads(pickle.dumps(judge))
    assert (again.role, again.rank, again.kind, again.cause) == ("judge", 1, "died", judge.cause)
    relayed = ray.exceptions.RayTaskError("score", "Traceback ...", judge).as_instanceof_cause()
    f = failure_of("reward", 0, "score", relayed)
    assert str(f) == "judge 1 died during score (its process exited)" and f.restartable
    assert f.__cause__ is relayed
    plain = ray.exceptions.RayTaskError("score", "...", ValueError("bad row"))
    f = failure_of("reward", 0, "score", plain)
    assert (f.role, f.kind, f.cause) == ("reward", "failed", "ValueError: bad row")


@ray.remote(num_cpus=0)
class _Judge:
    """A judge engine that is slow to answer (killed while it thinks)."""

    def pid(self) -> int:
        return os.getpid()

    def judge(self, prompts: list[str], responses: list[str]) -> None:
        time.sleep(30)


def test_a_dead_judge_engine_is_named_judge_not_reward():
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        engine = _Judge.remote()
        cfg = RewardConfig(judge=JudgeConfig(model_path="j"))
        reward = ray.remote(num_cpus=0)(RewardWorker).remote(cfg, 1, None, [engine])
        ids = {reward._actor_id.hex(): ("reward", 0)}  # the judge is no role of this driver's
        rollout = types.SimpleNamespace(prompts=["p"], responses=["r"], rows=[{}])
        ray.get(reward.__ray_ready__.remote())
        killer = threading.Timer(1.0, os.kill, (ray.get(engine.pid.remote()), signal.SIGKILL))
        ref = reward.score.remote(rollout)
        killer.start()
        with pytest.raises(RoleFailed) as err:
            get_named(ref, "score", HangLimits(60), lambda h: ids.get(h, ("an actor", -1)))
        f = err.value
        assert (f.role, f.rank, f.phase, f.kind) == ("judge", 0, "score", "died")
        assert str(f) == "judge 0 died during score (its process exited)" and f.restartable
    finally:
        ray.shutdown()
