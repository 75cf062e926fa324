"""deploy/: the KubeRay and `ray up` manifests parse and agree with the recipes, the cluster
shapes, the image tag and each other (resources, ports, token auth, dashboard exposure)."""

from __future__ import annotations

import copy
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
# The NVIDIA network operator's RDMA shared device plugin under its default name; an SR-IOV VF
# resource would be named by the cluster's SriovNetworkNodePolicy (deploy/README.md, "RDMA").
RDMA_RESOURCE = "rdma/rdma_shared_device_a"
RDMA_PREFIXES = ("rdma/",)
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
                assert c["env"][: len(want)] == want  # GPU workers add NCCL's fabric settings


def test_dashboard_stays_inside_the_cluster():
    for spec in all_specs():
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
        assert "ingress" not in json.dumps(spec).lower()
    for path in DEPLOY.rglob("*.yaml"):
        for doc in load(path):
            # hostnetwork-patch.yaml is a JSON patch (a list): it changes fields, adds no object
            assert isinstance(doc, list) or doc.get("kind") not in ("Ingress", "Service"), path
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


def container_of(group: dict) -> dict:
    (c,) = group["template"]["spec"]["containers"]
    return c


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


def rdma_resources(container: dict) -> dict[str, dict]:
    """The container's RDMA device-plugin resources, in limits and in requests."""
    res = container["resources"]
    return {
        kind: {k: v for k, v in res.get(kind, {}).items() if k.startswith(RDMA_PREFIXES)}
        for kind in ("limits", "requests")
    }


def test_rdma_devices_and_ipc_lock_on_the_gpu_groups_only():
    # Without an RDMA device in the container NCCL falls back to TCP on the pod network, which
    # is what the 24-rank ZeRO-3 group and the weight broadcast would then cross nodes over.
    for spec in all_specs():
        head = container_of(spec["headGroupSpec"])
        assert rdma_resources(head) == {"limits": {}, "requests": {}}
        assert "securityContext" not in head  # the CPU-only head neither asks for nor needs it
        for g in spec["workerGroupSpecs"]:
            # A pod's device-plugin resource is not a Ray resource: Ray's view of the group (and
            # so the placement and memory plans) stays what rayStartParams says. num-gpus is set
            # explicitly, so KubeRay does not scan the limits for it either.
            assert int(g["rayStartParams"]["num-gpus"]) > 0
            assert "rdma" not in json.dumps(g["rayStartParams"]).lower()
            c = container_of(g)
            rdma = rdma_resources(c)
            assert rdma["limits"] == rdma["requests"] == {RDMA_RESOURCE: "1"}, g["groupName"]
            # Memory registration pins pages: IPC_LOCK (and, for uid 1000, the runtime's memlock).
            assert c["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
            assert c["securityContext"].get("privileged", False) is False
            # NCCL's shared-memory transport within the node needs more than 64 MiB of /dev/shm.
            (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            (vol,) = [v for v in g["template"]["spec"]["volumes"] if v["name"] == shm["name"]]
            assert vol["emptyDir"]["medium"] == "Memory"
            assert gib(vol["emptyDir"]["sizeLimit"]) >= 16


def test_gpu_groups_tell_nccl_which_fabric_to_use():
    for spec in all_specs():
        assert not any(k.startswith("NCCL_") for k in env_of(container_of(spec["headGroupSpec"])))
        for g in spec["workerGroupSpecs"]:
            env = env_of(container_of(g))
            assert env["NCCL_IB_HCA"], g["groupName"]  # the HCAs (rails) NCCL may use
            assert env["NCCL_SOCKET_IFNAME"] == "eth0"  # bootstrap over the pod's own interface
            assert env["NCCL_DEBUG"] == "WARN"  # INFO only while checking the transport
            assert env.get("NCCL_IB_DISABLE", "0") == "0"


def json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add / replace / test, the operations the hostNetwork patch uses."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = op["path"].lstrip("/").split("/")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key = int(last) if isinstance(node, list) else last
        if op["op"] == "test":
            assert node[key] == op["value"], op
        elif op["op"] == "replace":
            assert key in node if isinstance(node, dict) else key < len(node), op
            node[key] = op["value"]
        elif op["op"] == "add":
            node[key] = op["value"]
        else:
            raise AssertionError(f"unexpected op {op}")
    return doc


@pytest.mark.parametrize("manifest", ["raycluster-llama3-8b.yaml", "raycluster-llama3-70b.yaml"])
def test_host_network_patch_applies_to_the_gpu_groups(manifest):
    (doc,) = load(KUBERAY / manifest)
    (ops,) = load(KUBERAY / "hostnetwork-patch.yaml")
    patched = json_patch(doc, ops)
    spec = patched["spec"]
    assert "hostNetwork" not in spec["headGroupSpec"]["template"]["spec"]
    for g in spec["workerGroupSpecs"]:
        pod = g["template"]["spec"]
        assert pod["hostNetwork"] is True
        assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"  # the head service still resolves
        env = env_of(container_of(g))
        assert env["NCCL_SOCKET_IFNAME"] != "eth0"  # the host's interface, not the pod's
        assert rdma_resources(container_of(g))["limits"] == {RDMA_RESOURCE: "1"}
    # Only those fields change: the rest of the cluster is the manifest's.
    for g in spec["workerGroupSpecs"]:
        del g["template"]["spec"]["hostNetwork"], g["template"]["spec"]["dnsPolicy"]
        for e in container_of(g)["env"]:
            if e["name"] == "NCCL_SOCKET_IFNAME":
                e["value"] = "eth0"
    assert patched == doc


def test_ray_up_gpu_containers_start_on_the_shipped_nodes_and_opt_into_rdma():
    from ray.autoscaler._private.docker import docker_start_cmds
    from ray.autoscaler._private.util import prepare_config, validate_config

    up = load(DEPLOY / "ray-up" / "llama3-8b.yaml")[0]
    validate_config(prepare_config(copy.deepcopy(up)))  # Ray's own schema, worker_run_options too
    docker = up["docker"]
    # Only the GPU nodes: the head (m6i) has no /dev/infiniband, and docker refuses to start a
    # container whose --device path is missing.
    assert not any("infiniband" in o or "IPC_LOCK" in o for o in docker["run_options"])
    assert "head_run_options" not in docker
    assert {t for t, n in up["available_node_types"].items() if n["resources"].get("GPU")} == {
        "trainer",
        "rollout",
    }
    assert all("docker" not in n for n in up["available_node_types"].values())  # no overrides
    opts = docker["worker_run_options"]
    # The shipped p4de nodes have no EFA interfaces, hence no /dev/infiniband: an active --device
    # for it would stop docker from starting every GPU container. It is a commented opt-in.
    gpu_nodes = [
        n["node_config"] for n in up["available_node_types"].values() if "GPU" in n["resources"]
    ]
    assert all("NetworkInterfaces" not in n for n in gpu_nodes)
    assert not any(o.startswith("--device") for o in opts)
    text = (DEPLOY / "ray-up" / "llama3-8b.yaml").read_text()
    assert "# - --device=/dev/infiniband" in text and "# - --env=NCCL_IB_HCA=" in text
    assert "--cap-add=IPC_LOCK" in opts
    assert "--ulimit memlock=-1:-1" in opts  # what makes registration work as uid 1000
    env = dict(o.removeprefix("--env=").split("=", 1) for o in opts if o.startswith("--env="))
    assert env["NCCL_SOCKET_IFNAME"] and env["NCCL_DEBUG"] == "WARN"
    # `ray up` runs every container on the host's network itself; the options must not add another.
    cmd = docker_start_cmds(
        "ubuntu",
        IMAGE,
        {},
        "rayrlhf",
        docker["run_options"] + opts,
        up["cluster_name"],
        "/home/ray",
        "docker",
    )
    assert "--net=host" in cmd and "--network" not in cmd
    assert "--cap-add=IPC_LOCK" in cmd and "--device" not in cmd
