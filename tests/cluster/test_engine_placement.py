"""Tensor-parallel engines on a real local Ray (its GPUs declared, none needed): each engine gets a
placement group of its own, one single-GPU bundle per worker, and the engine actor sits in bundle
0 without a GPU, so that workers started the way vLLM's Ray executor starts them (one per GPU
bundle of the actor's current placement group) each get a GPU of their own."""

from __future__ import annotations

import sys

import pytest
import ray
from ray.util.placement_group import placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayrlhf.cluster.actors import ActorSet
from rayrlhf.cluster.placement import PlacementError, engine_layout, vllm_executor_backend
from rayrlhf.config import Resources, RolloutConfig


@ray.remote(num_cpus=0)
def _worker() -> list:
    """What one vLLM worker would see: its GPUs."""
    return ray.get_gpu_ids()


class ProbeEngine:
    """Stands in for RolloutEngine: reports its placement and starts workers as vLLM's Ray
    executor does (num_gpus=1, num_cpus=0, bundle i of the current placement group)."""

    def __init__(self, index: int) -> None:
        self.index = index

    def where(self) -> dict:
        pg = ray.util.get_current_placement_group()
        return {"pg": pg.id.hex(), "bundles": pg.bundle_specs, "gpus": ray.get_gpu_ids()}

    def start_workers(self) -> list:
        pg = ray.util.get_current_placement_group()
        refs = [
            _worker.options(
                num_gpus=1,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i),
            ).remote()
            for i, b in enumerate(pg.bundle_specs)
            if b.get("GPU")
        ]
        return ray.get(refs, timeout=60)


@pytest.fixture(scope="module")
def local_ray():
    # Ray's workers cannot import this test module: ship its classes by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=4, num_gpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow  # a local Ray: ~10 s
def test_each_tp_engine_gets_its_own_group_of_single_gpu_bundles(local_ray):
    ro = RolloutConfig(
        num_engines=2, tensor_parallel_size=4, resources=Resources(num_cpus=0.5, num_gpus=1)
    )
    with ActorSet(phase_timeout_s=60, placement_timeout_s=30) as actors:
        engines = actors.start_engines("rollout", ProbeEngine, ro, lambda i: (i,))
        seen = actors.get([e.where.remote() for e in engines], "probe")
        assert len({s["pg"] for s in seen}) == 2  # a placement group per engine
        for s in seen:
            assert s["bundles"] == [{"CPU": 0.5, "GPU": 1.0}] * 4
            assert s["gpus"] == []  # the engine actor holds no GPU: its workers do
        workers = actors.get([e.start_workers.remote() for e in engines], "workers")
        gpus = [g for w in workers for ids in w for g in ids]
        assert sorted(gpus) == sorted(set(gpus)) and len(gpus) == 8  # one GPU each, all 8
        assert len(actors.groups["rollout"]) == 2 and len(actors.nodes("rollout")) == 1
        groups = list(actors.groups["rollout"])
    # Leaving the set released both engines' groups.
    assert all(placement_group_table(pg)["state"] == "REMOVED" for pg in groups)


def test_tp_layout_rules():
    one = RolloutConfig(num_engines=3, resources=Resources(num_gpus=1))
    assert (engine_layout(one).groups, engine_layout(one).bundles) == (3, 1)  # one group each
    tp = RolloutConfig(num_engines=3, tensor_parallel_size=2, resources=Resources(num_gpus=1))
    assert engine_layout(tp) == type(engine_layout(tp))(3, 2, "STRICT_PACK")
    assert vllm_executor_backend(2) == "ray" and vllm_executor_backend(1) is None
    for gpus in (0, 0.5, 2):
        bad = RolloutConfig(tensor_parallel_size=2, resources=Resources(num_gpus=gpus))
        with pytest.raises(PlacementError, match="exactly one GPU"):
            engine_layout(bad)
