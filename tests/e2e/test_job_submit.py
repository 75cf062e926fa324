"""`ray job submit` against a local head on loopback runs a 2-step job to SUCCEEDED.

The job builds the tiny models itself (`make_tiny_models`) inside Ray's copy of the working dir,
as a user's first job on a fresh cluster would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rayrlhf.cluster.placement import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _ray(*args, env, timeout=600):
    exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    return subprocess.run(
        [exe, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_job_submit_succeeds(tmp_path):
    port, dash = free_port(), free_port()
    # Own short session dir (AF_UNIX socket paths are limited to 107 bytes).
    temp = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    start = _ray(
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--num-cpus",
        "8",
        "--temp-dir",
        temp,
        "--disable-usage-stats",
        env=env,
    )
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        token = Path.home() / ".ray" / "auth_token"
        if token.exists():
            env["RAY_AUTH_TOKEN_PATH"] = str(token)
        job = _ray(
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{dash}",
            "--working-dir",
            ".",
            "--",
            "python",
            "-m",
            "rayrlhf.cli",
            "train",
            "--config",
            "configs/tiny-cpu.yaml",
            "--set",
            "steps=2",
            "--set",
            f"run_dir={tmp_path / 'run'}",
            env=env,
        )
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
        assert "succeeded" in job.stdout + job.stderr
        assert "step 2/2" in job.stdout
        assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 2
    finally:
        _ray("stop", "--force", env=env, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
