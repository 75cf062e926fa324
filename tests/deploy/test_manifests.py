"""deploy/: the KubeRay and `ray up` manifests parse and agree with the recipes, the cluster
shapes, the image tag and each other (resources, ports, token auth, dashboard exposure)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from rayrlhf.cluster.capacity import plan_placement
from rayrlhf.cluster.shape import ClusterShape, NodeType
from rayrlhf.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
IMAGE = f"rayrlhf:{PROJECT['version']}-gpu"
SECRET = "rayrlhf-ray-token"
# recipe -> (RayCluster manifest, shipped cluster shape)
CLUSTERS = {
    "llama3-8b-2x8xa100.yaml": ("raycluster-llama3-8b.yaml", "llama3-8b-2x8xa100.yaml"),
    "llama3-70b-9x8xa100.yaml": ("raycluster-llama3-70b.yaml", "llama3-70b-9x8xa100.yaml"),
}
ROLE_GROUP = {
    "policy": "trainer",
    "critic": "trainer",
    "reference": "trainer",
    "reward": "trainer",
    "rollout": "rollout",
}


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def cluster_spec(name: str) -> dict:
    (doc,) = load(KUBERAY / name)
    assert doc["kind"] == "RayCluster"
    return doc["spec"]


def gib(quantity: str) -> float:
    units = {"Gi": 1, "Ti": 1024, "Mi": 1 / 1024}
    m = re.fullmatch(r"(\d+)(Gi|Ti|Mi)", quantity)
    assert m, quantity
    return int(m.group(1)) * units[m.group(2)]


def node_type(name: str, group: dict, count: int | None) -> NodeType:
    """What a KubeRay group advertises to Ray, read from its rayStartParams."""
    params = group["rayStartParams"]
    # KubeRay passes `resources` to `ray start --resources` as a quoted JSON string.
    custom = json.loads(json.loads(params["resources"])) if "resources" in params else {}
    (container,) = group["template"]["spec"]["containers"]
    mem = container["resources"]["limits"]["memory"]
    # The GPU's memory is in the product name the pods select, e.g. NVIDIA-A100-SXM4-80GB.
    product = group["template"]["spec"].get("nodeSelector", {}).get("nvidia.com/gpu.product", "")
    gpu_gib = re.search(r"(\d+)GB$", product)
    return NodeType(
        name=name,
        count=count,
        num_cpus=float(params["num-cpus"]),
        num_gpus=float(params.get("num-gpus", 0)),
        memory_gib=gib(mem),
        gpu_memory_gib=float(gpu_gib.group(1)) if gpu_gib else None,
        custom=custom,
    )


def shape_of(spec: dict, replicas: str) -> ClusterShape:
    """The manifest's cluster with every worker group at `replicas` (min/max/replicas)."""
    types = [node_type("head", spec["headGroupSpec"], 1)]
    types += [node_type(g["groupName"], g, g[replicas]) for g in spec["workerGroupSpecs"]]
    return ClusterShape(node_types=types)


def pods(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def all_specs() -> list[dict]:
    specs = [cluster_spec(m) for m, _ in CLUSTERS.values()]
    (job,) = load(KUBERAY / "rayjob-llama3-8b.yaml")
    return specs + [job["spec"]["rayClusterSpec"]]


def test_every_yaml_parses():
    files = sorted(DEPLOY.rglob("*.y*ml")) + [ROOT / "docker" / ".hadolint.yaml"]
    assert len(files) >= 8
    for path in files:
        assert load(path), path


@pytest.mark.parametrize("recipe", sorted(CLUSTERS))
@pytest.mark.parametrize("replicas", ["maxReplicas", "minReplicas"])
def test_recipe_fits_its_manifest_roles_on_their_group(recipe, replicas):
    # minReplicas too: a run checks its placement against the nodes that are up.
    cfg = load_config(ROOT / "configs" / recipe)
    shape = shape_of(cluster_spec(CLUSTERS[recipe][0]), replicas)
    for p in plan_placement(cfg, shape):
        groups = {label.split("[")[0] for label in p.nodes}
        assert groups == {ROLE_GROUP[p.role]}, (p.role, p.nodes)


@pytest.mark.parametrize("recipe", sorted(CLUSTERS))
def test_recipe_custom_resources_and_gpus_exist_on_the_matching_group(recipe):
    cfg = load_config(ROOT / "configs" / recipe)
    spec = cluster_spec(CLUSTERS[recipe][0])
    groups = {g["groupName"]: node_type(g["groupName"], g, 1) for g in spec["workerGroupSpecs"]}
    for role, group in ROLE_GROUP.items():
        res = getattr(cfg, role).resources
        assert res.custom, f"{role} pins no node type"
        assert set(res.custom) <= set(groups[group].custom), (role, res.custom)
        assert 0 < res.num_gpus <= groups[group].num_gpus
        # The other group must not offer this role's marker, or the role could land there.
        others = [g for name, g in groups.items() if name != group]
        assert all(not set(res.custom) & set(g.custom) for g in others)


@pytest.mark.parametrize("recipe", sorted(CLUSTERS))
def test_shipped_shape_matches_the_manifest(recipe):
    manifest, shape_file = CLUSTERS[recipe]
    shipped = ClusterShape.from_yaml(DEPLOY / "cluster-shapes" / shape_file)
    assert shipped.model_copy(update={"models": {}}) == shape_of(cluster_spec(manifest), "replicas")
    # The memory plan finds every model the recipe names in the shape (none is on this machine).
    cfg = load_config(ROOT / "configs" / recipe)
    paths = {cfg.policy.model_path, cfg.critic.model_path, cfg.reward.model_path}
    assert paths <= set(shipped.models), paths - set(shipped.models)


def test_group_gpus_and_cpus_match_the_pod_limits():
    for spec in all_specs():
        for g in spec["workerGroupSpecs"]:
            params = g["rayStartParams"]
            (c,) = g["template"]["spec"]["containers"]
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            assert params["num-gpus"] == limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"]
            assert float(params["num-cpus"]) <= float(limits["cpu"])
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_rollout_group_autoscales_and_trainer_group_is_fixed():
    for spec in all_specs():
        assert spec["enableInTreeAutoscaling"] is True
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == {"trainer", "rollout"}
        assert groups["rollout"]["maxReplicas"] > groups["rollout"]["minReplicas"]
        t = groups["trainer"]
        assert t["minReplicas"] == t["replicas"] == t["maxReplicas"]


def test_images_are_the_project_version():
    dockerfile = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert f"ARG RAYRLHF_VERSION={PROJECT['version']}\n" in dockerfile
    ray_pin = next(d for d in PROJECT["dependencies"] if d.startswith("ray["))
    for spec in all_specs():
        assert spec["rayVersion"] == ray_pin.split("==")[1]
        for pod in pods(spec):
            for c in pod["spec"]["containers"]:
                assert c["image"] == IMAGE
    up = load(DEPLOY / "ray-up" / "llama3-8b.yaml")[0]
    assert up["docker"]["image"] == IMAGE


def test_token_auth_from_the_secret_everywhere():
    want = [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {
            "name": "RAY_AUTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": SECRET, "key": "auth_token"}},
        },
    ]
    for spec in all_specs():
        assert spec["authOptions"] == {"mode": "token", "secretName": SECRET}
        assert spec["autoscalerOptions"]["env"] == want
        for pod in pods(spec):
            for c in pod["spec"]["containers"]:
                assert c["env"] == want


def test_dashboard_stays_inside_the_cluster():
    for spec in all_specs():
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
        assert "ingress" not in json.dumps(spec).lower()
    for path in DEPLOY.rglob("*.yaml"):
        for doc in load(path):
            assert doc.get("kind") not in ("Ingress", "Service"), path
    up = load(DEPLOY / "ray-up" / "llama3-8b.yaml")[0]
    assert "--dashboard-host=127.0.0.1" in " ".join(up["head_start_ray_commands"])


def test_pods_run_as_non_root():
    for spec in all_specs():
        for pod in pods(spec):
            sc = pod["spec"]["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000


def test_ports_agree():
    metrics = None
    for spec in all_specs():
        head = spec["headGroupSpec"]
        (c,) = head["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["gcs-server"] == 6379 and ports["dashboard"] == 8265
        assert head["rayStartParams"].get("dashboard-port", "8265") == "8265"
        assert head["rayStartParams"].get("port", "6379") == "6379"
        metrics = ports["metrics"]
        for g in [head, *spec["workerGroupSpecs"]]:
            (c,) = g["template"]["spec"]["containers"]
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert int(g["rayStartParams"]["metrics-export-port"]) == ports["metrics"] == metrics
    (monitor,) = load(KUBERAY / "podmonitor.yaml")
    scraped = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert scraped == {"metrics", "driver-metrics"}
    up = load(DEPLOY / "ray-up" / "llama3-8b.yaml")[0]
    head_cmd = " ".join(up["head_start_ray_commands"])
    worker_cmd = " ".join(up["worker_start_ray_commands"])
    assert "--port=6379" in head_cmd and "--dashboard-port=8265" in head_cmd
    assert f"--metrics-export-port={metrics}" in head_cmd
    assert "--address=$RAY_HEAD_IP:6379" in worker_cmd
    assert f"--metrics-export-port={metrics}" in worker_cmd


def test_rayjob_runs_the_recipe_on_the_raycluster_spec():
    (job,) = load(KUBERAY / "rayjob-llama3-8b.yaml")
    assert job["kind"] == "RayJob"
    assert job["spec"]["rayClusterSpec"] == cluster_spec("raycluster-llama3-8b.yaml")
    assert job["spec"]["entrypoint"].startswith(
        "python -m rayrlhf.cli train --config /app/configs/"
    )
    recipe = job["spec"]["entrypoint"].split("/app/configs/")[1].split()[0]
    assert recipe in CLUSTERS
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_ray_up_matches_the_kuberay_groups():
    up = load(DEPLOY / "ray-up" / "llama3-8b.yaml")[0]
    spec = cluster_spec("raycluster-llama3-8b.yaml")
    for g in spec["workerGroupSpecs"]:
        t = node_type(g["groupName"], g, 1)
        node = up["available_node_types"][g["groupName"]]
        assert node["resources"] == {"CPU": t.num_cpus, "GPU": t.num_gpus, **t.custom}
        assert node["min_workers"] == g["minReplicas"]
        assert node["max_workers"] == g["maxReplicas"]
    assert up["available_node_types"]["head"]["resources"] == {"CPU": 0}


def test_ray_up_token_comes_from_the_env_file():
    up = load(DEPLOY / "ray-up" / "llama3-8b.yaml")[0]
    (remote,) = up["file_mounts"]
    for cmd in [*up["head_start_ray_commands"], *up["worker_start_ray_commands"]]:
        if "ray start" in cmd:
            assert f". {remote} && set +a" in cmd
    example = (DEPLOY / "ray-up" / "ray-auth.env.example").read_text()
    assert "\nRAY_AUTH_MODE=token\n" in example and "\nRAY_AUTH_TOKEN=" in example
    assert up["file_mounts"][remote].startswith("~/")  # the token stays outside the repository


@pytest.mark.parametrize("recipe", sorted(CLUSTERS))
def test_driver_metrics_port_is_open_on_the_head(recipe):
    # The driver (a Ray job) runs in the head pod and serves the run's /metrics there.
    cfg = load_config(ROOT / "configs" / recipe)
    (c,) = cluster_spec(CLUSTERS[recipe][0])["headGroupSpec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert cfg.metrics.prometheus and ports["driver-metrics"] == cfg.metrics.port
    assert cfg.metrics.host == "0.0.0.0"  # reachable through the ClusterIP service only
    scrape = load(DEPLOY / "monitoring" / "prometheus.yml")[0]
    target = scrape["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target.endswith(f":{cfg.metrics.port}")
