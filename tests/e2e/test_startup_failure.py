"""A run that fails while its roles start leaves no actor and no reservation behind.

Each recipe is started on a real local Ray cluster with a role that cannot start: its bundles
are taken by another placement group (so reserving them times out after the earlier roles'
actors exist), or its model cannot load (so one rank dies while the others wait for it at the
rendezvous). Afterwards every actor must be dead and every placement group but the blocker
removed.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table

from rayrlhf.cluster.placement import PlacementError
from rayrlhf.config import load_config
from rayrlhf.recipes.best_of_n import run_best_of_n
from rayrlhf.recipes.dpo import load_dpo_config, train_dpo
from rayrlhf.recipes.ppo import train
from rayrlhf.recipes.sft import load_sft_config, train_sft

pytestmark = pytest.mark.slow

CPUS = 7
"""PPO's tiny recipe reserves 6 CPUs: policy 2, critic, reference, reward and one engine."""


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=CPUS, include_dashboard=False)
    yield
    ray.shutdown()


def _block(cpus: int):
    """Take `cpus` of the cluster's CPUs in a placement group of their own."""
    pg = placement_group([{"CPU": 1}] * cpus, strategy="SPREAD")
    ray.get(pg.ready(), timeout=30)
    return pg


def _left_behind(blocker) -> tuple[list, list]:
    """(actors not dead, placement groups not removed, the blocker aside), once they settle."""
    keep = {blocker.id.hex()} if blocker else set()
    deadline = time.monotonic() + 30
    while True:
        actors = [a for a in ray._private.state.actors().values() if a["State"] != "DEAD"]
        groups = [
            pg_id
            for pg_id, pg in placement_group_table().items()
            if pg["state"] != "REMOVED" and pg_id not in keep
        ]
        if not (actors or groups) or time.monotonic() > deadline:
            return [a["ActorClassName"] for a in actors], groups
        time.sleep(0.5)


def _common(tiny_models, tmp_path) -> list[str]:
    return [f"run_dir={tmp_path / 'run'}", "make_tiny_models=null", "placement_timeout_s=5"]


def test_ppo_placement_failure_releases_every_started_role(local_ray, tiny_models, tmp_path):
    cfg = load_config(
        None,
        [
            *_common(tiny_models, tmp_path),
            *(f"{r}.model_path={tiny_models[r]}" for r in ("policy", "critic", "reward")),
            "metrics.port=0",
        ],
    )
    blocker = _block(CPUS - 5)  # room for every role but the rollout engine, reserved last
    try:
        with pytest.raises(PlacementError, match="rollout-0: could not reserve"):  # its own group
            train(cfg)
        assert _left_behind(blocker) == ([], [])
    finally:
        ray.util.remove_placement_group(blocker)


def test_dpo_placement_failure_releases_the_policy_ranks(local_ray, tiny_models, tmp_path):
    cfg = load_dpo_config(
        None,
        [*_common(tiny_models, tmp_path), f"policy.model_path={tiny_models['policy']}"],
    )
    blocker = _block(CPUS - 2)  # room for the two policy ranks, not the reference
    try:
        with pytest.raises(PlacementError, match="reference: could not reserve"):
            train_dpo(cfg)
        assert _left_behind(blocker) == ([], [])
    finally:
        ray.util.remove_placement_group(blocker)


def test_best_of_n_placement_failure_releases_the_engines(local_ray, tiny_models, tmp_path):
    cfg = load_config(
        None,
        [
            *_common(tiny_models, tmp_path),
            *(f"{r}.model_path={tiny_models[r]}" for r in ("policy", "critic", "reward")),
        ],
    )
    blocker = _block(CPUS - 1)  # room for the engine, not the reward actor
    try:
        with pytest.raises(PlacementError, match="reward: could not reserve"):
            run_best_of_n(cfg, n=2, num_prompts=2)
        assert _left_behind(blocker) == ([], [])
    finally:
        ray.util.remove_placement_group(blocker)


def test_sft_rank_that_cannot_load_releases_the_waiting_ranks(local_ray, tiny_models, tmp_path):
    """Rank 0 dies loading a corrupt checkpoint while rank 1 waits for it at the rendezvous."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["policy"], broken)
    for weights in Path(broken).glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    cfg = load_sft_config(
        None, [*_common(tiny_models, tmp_path), f"model_path={broken}", "phase_timeout_s=120"]
    )
    with pytest.raises(ray.exceptions.RayError):
        train_sft(cfg)
    assert _left_behind(None) == ([], [])
