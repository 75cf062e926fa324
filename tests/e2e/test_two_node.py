"""Two Ray nodes on this machine, on two loopback addresses, as a cluster's node types.

The head (started on 127.0.0.1, where the driver runs, as on a cluster's CPU head) advertises
`rollout_node`; a second raylet on 127.0.0.2 advertises `trainer_node`. A 2-step tiny run pins
every trainer role to trainer_node and the engine to rollout_node, and syncs weights over the
broadcast transport: its group's rendezvous must be on policy rank 0's node (127.0.0.2), which
hosts the TCPStore, not on the driver's. The state API must show each actor on its node.
`check-placement` against the live cluster agrees, and names the missing resource when the run
asks for more engines than the rollout node holds.

The nodes are stopped by killing the processes whose command line names this test's temp dir:
`ray stop` would also stop any other Ray instance on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rayrlhf.cluster.rendezvous import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TRAINER_ROLES = ("policy", "critic", "reference", "reward")
TRAINER_ACTORS = {"PolicyWorker", "CriticWorker", "ReferenceWorker", "RewardWorker"}


def _ray(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    return subprocess.run(
        [exe, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _ports(n: int) -> list[int]:
    """n distinct free ports (a raylet and its agents each need their own)."""
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def _node_ports(ports: list[int]) -> list[str]:
    names = [
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    ]
    return [arg for name, port in zip(names, ports) for arg in (name, str(port))]


def _pids_using(temp: str) -> list[int]:
    """Processes whose command line names `temp`: this test's raylets, GCS, agents, workers."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if temp in cmdline:
            pids.append(int(proc.name))
    return pids


def _stop_nodes(temp: str) -> None:
    for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        for pid in _pids_using(temp):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while _pids_using(temp) and time.monotonic() < deadline:
            time.sleep(0.3)


HEAD_IP, WORKER_IP = "127.0.0.1", "127.0.0.2"


def _start_nodes(temp: str, env: dict) -> tuple[int, int]:
    """Head on 127.0.0.1 (2 CPUs, rollout_node 2) and worker on 127.0.0.2 (6 CPUs,
    trainer_node 6); (GCS, dashboard)."""
    gcs, dash, client, *ports = _ports(15)
    # Worker ports 0/0: the OS picks them, so two raylets on one machine never hand out the same.
    common = ["--disable-usage-stats", "--min-worker-port", "0", "--max-worker-port", "0"]
    head = _ray(
        "start", "--head", "--port", str(gcs), "--num-cpus", "2",
        "--resources", '{"rollout_node": 2}', "--temp-dir", temp,
        "--node-ip-address", HEAD_IP,
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--ray-client-server-port", str(client), *_node_ports(ports[:6]), *common,
        env=env,
    )  # fmt: skip
    assert head.returncode == 0, head.stderr[-3000:]
    worker = _ray(
        "start", "--address", f"{HEAD_IP}:{gcs}", "--num-cpus", "6",
        "--resources", '{"trainer_node": 6}', "--temp-dir", temp,
        "--node-ip-address", WORKER_IP, *_node_ports(ports[6:12]), *common,
        env=env,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr[-3000:]
    return gcs, dash


def _pins(role_resource: dict[str, str]) -> list[str]:
    out = []
    for role, resource in role_resource.items():
        out += ["--set", f"{role}.resources.custom={{{resource}: 1}}"]
    return out


def _actors_by_class(gcs: int, env: dict) -> dict[str, set[str]]:
    """{actor class: node ids it ran on}, from the state API."""
    out = _ray(
        "list", "actors", "--address", f"127.0.0.1:{gcs}", "--format", "json",
        "--limit", "1000", "--detail", env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    nodes: dict[str, set[str]] = {}
    for actor in json.loads(out.stdout):
        nodes.setdefault(actor["class_name"], set()).add(actor["node_id"])
    return nodes


def _node_ids(gcs: int, env: dict) -> dict[str, tuple[str, str]]:
    """{'head' | 'worker': (node id, node IP)}."""
    out = _ray("list", "nodes", "--address", f"127.0.0.1:{gcs}", "--format", "json", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    ids = {}
    for node in json.loads(out.stdout):
        if node["state"] == "ALIVE":
            ids["head" if node["is_head_node"] else "worker"] = (node["node_id"], node["node_ip"])
    return ids


def test_roles_land_on_their_node_types(tmp_path):
    temp = tempfile.mkdtemp(prefix="rr-", dir="/tmp")  # AF_UNIX paths: keep it short
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    token = Path.home() / ".ray" / "auth_token"
    if token.exists():
        env["RAY_AUTH_TOKEN_PATH"] = str(token)
    try:
        gcs, _ = _start_nodes(temp, env)
        if token.exists():  # written by `ray start` if it was not there yet
            env["RAY_AUTH_TOKEN_PATH"] = str(token)
        pins = _pins({**dict.fromkeys(TRAINER_ROLES, "trainer_node"), "rollout": "rollout_node"})
        base = ["--config", "configs/tiny-cpu.yaml", "--set", f"ray_address=127.0.0.1:{gcs}"]
        cli = [sys.executable, "-m", "rayrlhf.cli"]

        placement = subprocess.run(
            [*cli, "check-placement", *base, *pins],
            env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert placement.returncode == 0, placement.stdout + placement.stderr
        table = placement.stdout  # the worker is the trainer_node type, the head rollout_node
        assert "trainer_node[0] x2" in table and "head[0] x1" in table, table

        start = time.monotonic()
        too_many = subprocess.run(
            [*cli, "check-placement", *base, *pins, "--set", "rollout.num_engines=3"],
            env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert too_many.returncode == 2, too_many.stdout + too_many.stderr
        assert "rollout:" in too_many.stderr and "rollout_node" in too_many.stderr
        assert time.monotonic() - start < 30

        run = subprocess.run(
            [
                *cli, "train", *base, *pins,
                "--set", "steps=2",
                "--set", f"run_dir={tmp_path / 'run'}",
                "--set", "metrics.port=0",
                "--set", "metrics.plots=false",
                "--set", "save_final=false",
                "--set", "placement_timeout_s=60",
                "--set", "sync.transport=broadcast",
            ],
            env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
        assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 2
        assert "weight sync: broadcast" in run.stdout, run.stdout[-2000:]
        # Policy rank 0 hosts the group's TCPStore: the rendezvous is its node's, not the
        # driver's (the head's, 127.0.0.1), where no store would listen on a real cluster.
        assert f"rendezvous {WORKER_IP}:" in run.stdout, run.stdout[-2000:]

        ids = _node_ids(gcs, env)
        # Two addresses: the worker's is 127.0.0.2; Ray may report the head under the host's.
        assert ids["worker"][1] == WORKER_IP and ids["head"][1] != WORKER_IP, ids
        actors = _actors_by_class(gcs, env)
        assert actors["RolloutEngine"] == {ids["head"][0]}, actors
        for cls in TRAINER_ACTORS:
            assert actors[cls] == {ids["worker"][0]}, (cls, actors)
    finally:
        _stop_nodes(temp)
        shutil.rmtree(temp, ignore_errors=True)
