"""The placement check: first-fit packing of every role's bundles onto a cluster shape.

Offline shapes only; the live path (`cluster_shape_from_ray` on real nodes) runs in
tests/e2e/test_two_node.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayrlhf.cluster.capacity import check_capacity, plan_placement
from rayrlhf.cluster.live import shape_from_nodes
from rayrlhf.cluster.placement import PlacementError
from rayrlhf.cluster.shape import ClusterShape, NodeType
from rayrlhf.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ROOT / "deploy" / "cluster-shapes"
RECIPES = {
    "llama3-8b-2x8xa100.yaml": "llama3-8b-2x8xa100.yaml",
    "llama3-70b-9x8xa100.yaml": "llama3-70b-9x8xa100.yaml",
    "tiny-cpu.yaml": "tiny-cpu-local.yaml",
}


def gpu_cfg(**sets: object) -> object:
    """The 8B recipe with overrides, e.g. gpu_cfg(**{"rollout.num_engines": 9})."""
    return load_config(
        ROOT / "configs" / "llama3-8b-2x8xa100.yaml", [f"{k}={v}" for k, v in sets.items()]
    )


def shape(*types: dict) -> ClusterShape:
    return ClusterShape(node_types=[NodeType(**t) for t in types])


TRAINER = {"name": "trainer", "num_cpus": 88, "num_gpus": 8, "custom": {"trainer_node": 1}}
ROLLOUT = {"name": "rollout", "num_cpus": 88, "num_gpus": 8, "custom": {"rollout_node": 1}}


def placement_error(cfg, shp) -> str:
    with pytest.raises(PlacementError) as info:
        check_capacity(cfg, shp)
    return str(info.value)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipes_validate_and_fit_their_clusters(recipe):
    cfg = load_config(ROOT / "configs" / recipe)
    check_capacity(cfg, ClusterShape.from_yaml(SHAPES / RECIPES[recipe]))
    if recipe != "tiny-cpu.yaml":
        assert (cfg.sync.transport, cfg.sync.backend) == ("broadcast", "nccl")


def test_roles_land_on_their_node_type():
    plan = plan_placement(
        gpu_cfg(), ClusterShape.from_yaml(SHAPES / RECIPES["llama3-8b-2x8xa100.yaml"])
    )
    where = {p.role: set(p.nodes) for p in plan}
    assert where == {
        "policy": {"trainer[0]"},
        "critic": {"trainer[0]"},
        "reference": {"trainer[0]"},
        "reward": {"trainer[0]"},
        "rollout": {"rollout[0]"},
    }
    assert [p.role for p in plan] == ["policy", "critic", "reference", "reward", "rollout"]
    assert len(plan[0].nodes) == 4 and len(plan[-1].nodes) == 8


def test_missing_custom_resource_names_role_and_resource():
    msg = placement_error(gpu_cfg(), shape({**TRAINER, "name": "trainer"}))
    assert msg.startswith("rollout:")
    assert "no node type offers rollout_node" in msg


def test_bundle_larger_than_any_single_node():
    msg = placement_error(gpu_cfg(**{"rollout.resources.num_gpus": 16}), shape(TRAINER, ROLLOUT))
    assert msg.startswith("rollout:")
    assert "no single node can hold one bundle" in msg and "GPU 8" in msg


def test_too_few_gpus_in_total():
    # 12 engines x 1 GPU on one 8-GPU rollout node: each fits, not all of them.
    msg = placement_error(gpu_cfg(**{"rollout.num_engines": 12}), shape(TRAINER, ROLLOUT))
    assert msg.startswith("rollout: needs 12 x")
    assert "12 GPU, 1.5 rollout_node in all" in msg
    assert "have 88 CPU, 8 GPU, 1 rollout_node free after policy, critic, reference, reward" in msg


def test_earlier_roles_use_up_the_node():
    # The policy's 8 bundles fill the trainer node; the critic finds no GPU left.
    cfg = gpu_cfg(**{"policy.num_ranks": 8, "algorithm.rollout_batch_size": 1024})
    msg = placement_error(cfg, shape(TRAINER, ROLLOUT))
    assert msg.startswith("critic:") and "have 0 GPU, 0 trainer_node free after policy" in msg


def test_fragmented_free_space_is_reported():
    # Two nodes with 3 CPUs each: 6 free in total, but a 2-CPU bundle fits once per node.
    shp = shape(
        {"name": "train", "num_cpus": 5},
        {"name": "gen", "count": 2, "num_cpus": 3, "custom": {"x": 1}},
    )
    sets = [
        "rollout.num_engines=3",
        "rollout.resources.num_cpus=2",
        "rollout.resources.custom={x: 0.25}",
    ]
    msg = placement_error(load_config(None, sets), shp)
    assert msg.startswith("rollout:") and "split across nodes and only 2 bundles fit" in msg


def test_pack_prefers_one_node_then_spreads():
    cfg = load_config(None, ["policy.num_ranks=2", "critic.num_ranks=1"])
    two = shape({"name": "n", "count": 2, "num_cpus": 3})
    plan = plan_placement(cfg, two)
    assert plan[0].nodes == ("n[0]", "n[0]")  # both policy ranks on one node (PACK)
    assert plan[1].nodes == ("n[0]",)
    assert set(plan[4].nodes) == {"n[1]"}
    # 4 ranks fit on no single 3-CPU node: first-fit spreads them over both.
    cfg4 = load_config(None, ["policy.num_ranks=4", "policy.micro_batch_size=4"])
    plan = plan_placement(cfg4, shape({"name": "n", "count": 3, "num_cpus": 3}))
    assert plan[0].nodes == ("n[0]", "n[0]", "n[0]", "n[1]")


def test_fractional_amounts_fill_a_whole_node():
    # 8 x 0.125 trainer_node fill a node that advertises 1; a ninth bundle does not fit.
    check_capacity(gpu_cfg(), shape(TRAINER, ROLLOUT))
    cfg = gpu_cfg(**{"rollout.num_engines": 9})
    msg = placement_error(cfg, shape(TRAINER, {**ROLLOUT, "num_gpus": 16}))
    assert "1.125 rollout_node" in msg and "1 rollout_node free" in msg


def test_autoscaled_node_type_is_unbounded():
    cfg = gpu_cfg(**{"rollout.num_engines": 40})
    plan = plan_placement(cfg, shape(TRAINER, {**ROLLOUT, "count": None}))
    assert len(set(plan[-1].nodes)) == 5  # 40 engines, 8 a node


def test_zero_count_node_type_offers_nothing():
    msg = placement_error(gpu_cfg(), shape(TRAINER, {**ROLLOUT, "count": 0}))
    assert "no node type offers rollout_node" in msg


def test_shape_validation():
    with pytest.raises(ValueError, match="whole numbers"):
        NodeType(name="n", num_cpus=1, custom={"trainer_node": 0.5})
    with pytest.raises(ValueError, match="num_gpus"):
        NodeType(name="n", num_cpus=1, custom={"GPU": 1})
    with pytest.raises(ValueError, match="unique"):
        shape({"name": "n", "num_cpus": 1}, {"name": "n", "num_cpus": 2})
    with pytest.raises(ValueError):
        NodeType(name="n", num_cpus=1, gpus=2)  # extra="forbid": a typo is an error


def test_shape_yaml_errors_name_the_field(tmp_path):
    bad = tmp_path / "shape.yaml"
    bad.write_text("node_types:\n  - name: n\n    num_cpus: 4\n    num_gpu: 8\n")
    with pytest.raises(ConfigError, match=r"node_types\.0\.num_gpu: unknown key"):
        ClusterShape.from_yaml(bad)


RAY_NODE = {
    "Alive": True,
    "Resources": {"CPU": 88.0, "GPU": 8.0, "memory": 2.0**40, "object_store_memory": 1e9},
}


def _ray_node(custom: dict, alive: bool = True, head: bool = False) -> dict:
    res = {**RAY_NODE["Resources"], **custom, "node:10.0.0.1": 1.0}
    if head:
        res = {"CPU": 0.0, "node:__internal_head__": 1.0, "memory": 2.0**36}
    return {"Alive": alive, "Resources": res}


def test_shape_from_ray_nodes_groups_alive_nodes():
    nodes = [
        _ray_node({}, head=True),
        _ray_node({"trainer_node": 1.0}),
        _ray_node({"rollout_node": 1.0}),
        _ray_node({"rollout_node": 1.0}),
        _ray_node({"rollout_node": 1.0}, alive=False),
    ]
    shp = shape_from_nodes(nodes)
    got = {t.name: (t.count, t.num_gpus, t.custom) for t in shp.node_types}
    assert got == {
        "head": (1, 0.0, {}),
        "trainer_node": (1, 8.0, {"trainer_node": 1.0}),
        "rollout_node": (2, 8.0, {"rollout_node": 1.0}),
    }
    assert shp.node_types[1].memory_gib == 1024.0
    check_capacity(gpu_cfg(**{"rollout.num_engines": 16}), shp)
    with pytest.raises(PlacementError, match="rollout"):
        check_capacity(gpu_cfg(**{"rollout.num_engines": 17}), shp)


def test_shape_from_ray_adds_autoscaler_headroom():
    nodes = [
        _ray_node({}, head=True),
        _ray_node({"trainer_node": 1.0}),
        _ray_node({"rollout_node": 1.0}),
    ]
    res = {"CPU": 88.0, "GPU": 8.0, "rollout_node": 1.0, "memory": 2.0**40}
    shp = shape_from_nodes(
        nodes, [("rollout", res, 3), ("trainer", {"CPU": 88.0, "GPU": 8.0, "trainer_node": 1.0}, 1)]
    )
    extra = {t.name: t.count for t in shp.node_types if "autoscaler" in t.name}
    assert extra == {"rollout (autoscaler)": 2}  # 3 at most, 1 already up; trainer is at max
    check_capacity(gpu_cfg(**{"rollout.num_engines": 24}), shp)
    unlimited = shape_from_nodes(nodes, [("rollout", res, -1)])
    check_capacity(gpu_cfg(**{"rollout.num_engines": 80}), unlimited)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rayrlhf.cli", "check-placement", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_cli_prints_the_placement_table():
    out = _cli(
        "--config",
        "configs/llama3-8b-2x8xa100.yaml",
        "--cluster",
        str(SHAPES / "llama3-8b-2x8xa100.yaml"),
    )
    assert out.returncode == 0, out.stderr
    assert "rollout    8" in out.stdout and "rollout[0] x8" in out.stdout
    assert "placeable" in out.stdout


def test_cli_unplaceable_exits_2_naming_role_and_resource_fast():
    start = time.monotonic()
    out = _cli("--cluster", str(SHAPES / "tiny-cpu-local.yaml"), "--set", "rollout.num_engines=50")
    elapsed = time.monotonic() - start
    assert out.returncode == 2, out.stdout + out.stderr
    assert "rollout:" in out.stderr and "CPU" in out.stderr and "50 CPU in all" in out.stderr
    assert elapsed < 30


def test_cli_bad_input_exits_2():
    out = _cli("--cluster", str(SHAPES / "nope.yaml"))
    assert out.returncode == 2 and "nope.yaml" in out.stderr
    out = _cli("--cluster", str(SHAPES / "tiny-cpu-local.yaml"), "--set", "rollout.num_engine=2")
    assert out.returncode == 2 and "rollout.num_engine: unknown key" in out.stderr


def test_cli_live_without_a_cluster_fails_fast():
    start = time.monotonic()
    out = _cli("--set", "ray_address=127.0.0.1:1")
    assert out.returncode == 2 and "no Ray cluster answers" in out.stderr
    assert time.monotonic() - start < 30


def test_roles_check_capacity_before_reserving(monkeypatch):
    """`Roles` fails on an unplaceable run before it reserves anything (no Ray needed)."""
    from rayrlhf.cluster import actors
    from rayrlhf.recipes import ppo_roles as roles

    tiny = ClusterShape.from_yaml(SHAPES / "tiny-cpu-local.yaml")
    monkeypatch.setattr(roles, "cluster_shape_from_ray", lambda: tiny)
    monkeypatch.setattr(actors, "reserve", lambda *a, **k: pytest.fail("reserve() was called"))
    with pytest.raises(PlacementError, match="rollout: .*CPU"):
        roles.Roles(load_config(None, ["rollout.num_engines=50"]))
