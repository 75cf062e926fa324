"""`ray job submit` against a local head on loopback, as the README shows it, on one head:

- a 2-step job runs to SUCCEEDED. It builds the tiny models itself (`make_tiny_models`) inside
  Ray's copy of the working dir, as a user's first job on a fresh cluster would;
- `ray job stop` on a running job (RAY_JOB_STOP_WAIT_TIME_S in its runtime env, as the README
  says) ends it STOPPED after the driver's graceful stop: the step finishes, a complete checkpoint
  is written. Resubmitted with `--resume`, the job finishes the run, and the ledger holds every
  step once with the prompts an uninterrupted run draws.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_two_node import _stop_nodes
from tiny_runs import tiny_ppo_sets
from transformers import AutoTokenizer

from rayrlhf.cluster.placement import LOOPBACK_ENV, free_port
from rayrlhf.config import load_config
from rayrlhf.data.prompts import PromptSet
from rayrlhf.runtime.checkpoint import newest_complete, verify
from rayrlhf.runtime.preflight import context_limit

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS, BATCH = 5, 16
STOP_LINE = r"rayrlhf: stopped by SIGTERM after step (\d+); checkpoint: (\S+); resume with --resume"


def _ray(*args, env, timeout=600):
    return subprocess.run(
        [_exe(), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _exe() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


@pytest.fixture(scope="module")
def head():
    """One local head on loopback for the module: (client env, job API address)."""
    port, dash = free_port(), free_port()
    # Own short session dir (AF_UNIX socket paths are limited to 107 bytes).
    temp = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", **LOOPBACK_ENV}  # the README's head
    env.pop("RAY_ADDRESS", None)
    start = _ray(
        "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "8",
        "--temp-dir", temp, "--disable-usage-stats", env=env,
    )  # fmt: skip
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        token = Path.home() / ".ray" / "auth_token"
        if token.exists():
            env["RAY_AUTH_TOKEN_PATH"] = str(token)
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        _stop_nodes(temp)  # this head's processes only: `ray stop` would stop every Ray here
        shutil.rmtree(temp, ignore_errors=True)


def train_cmd(*sets: str) -> list[str]:
    cmd = ["python", "-m", "rayrlhf.cli", "train", "--config", "configs/tiny-cpu.yaml"]
    return cmd + [a for s in sets for a in ("--set", s)]


def test_job_submit_succeeds(head, tmp_path):
    env, address = head
    job = _ray(
        "job", "submit", "--address", address, "--working-dir", ".", "--",
        *train_cmd("steps=2", f"run_dir={tmp_path / 'run'}"), env=env,
    )  # fmt: skip
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    assert "succeeded" in job.stdout + job.stderr
    assert "step 2/2" in job.stdout
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 2


def tiny_sets(tiny_models, run_dir: Path) -> list[str]:
    return tiny_ppo_sets(tiny_models, run_dir, STEPS, BATCH)


def submit(env, address: str, sid: str, cmd: list[str], log: Path) -> subprocess.Popen:
    """`ray job submit` as the README writes it (grace time in the runtime env), tailing the
    job's log into `log` until it ends."""
    grace = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "600"}})
    args = ["job", "submit", "--address", address, "--submission-id", sid]
    args += ["--runtime-env-json", grace, "--working-dir", ".", "--", *cmd]
    with log.open("w") as out:
        return subprocess.Popen(
            [_exe(), *args], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True
        )


def records(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / name
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def steps_in(run_dir: Path, name: str = "metrics.jsonl") -> list[int]:
    return [rec["step"] for rec in records(run_dir, name)]


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, n: int, log: Path) -> None:
    deadline = time.monotonic() + 900
    while len(steps_in(run_dir)) < n:
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)


def expected_ledger(tiny_models, run_dir: Path) -> list[list[int]]:
    """The prompt indices an uninterrupted run trains on, step by step."""
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", tiny_sets(tiny_models, run_dir))
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy.model_path)
    prompts = PromptSet.load(cfg.data, tokenizer, cfg.seed, context_limit(cfg))
    assert len(prompts) >= STEPS * BATCH  # one epoch: a repeated prompt would be a replay
    return [prompts.indices(step, BATCH) for step in range(STEPS)]


def test_job_stop_then_resume(head, tiny_models, tmp_path):
    env, address = head
    run = tmp_path / "run"
    first = submit(env, address, "rr-stop", train_cmd(*tiny_sets(tiny_models, run)), tmp_path / "1")
    wait_for_steps(first, run, 2, tmp_path / "1")  # past the step-2 checkpoint's start
    stop = _ray("job", "stop", "--address", address, "rr-stop", env=env, timeout=900)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    first.wait(timeout=120)
    status = _ray("job", "status", "--address", address, "rr-stop", env=env)
    # The CLI's words for JobStatus.STOPPED (FAILED would be "Job '...' failed").
    assert "Job 'rr-stop' was stopped" in status.stdout, status.stdout + status.stderr
    logs = _ray("job", "logs", "--address", address, "rr-stop", env=env).stdout
    line = re.search(STOP_LINE, logs)
    assert line and "rayrlhf: SIGTERM received" in logs, logs[-4000:]
    done, path = int(line[1]), Path(line[2])
    assert 2 <= done < STEPS and path == run / "checkpoints" / f"step_{done}", logs[-4000:]
    assert verify(path)["step"] == done and newest_complete(run) == path
    assert steps_in(run) == steps_in(run, "ledger.jsonl") == list(range(done))

    again = train_cmd(*tiny_sets(tiny_models, run)) + ["--resume"]
    second = submit(env, address, "rr-resume", again, tmp_path / "2")
    assert second.wait(timeout=900) == 0, (tmp_path / "2").read_text()[-4000:]
    out = (tmp_path / "2").read_text()
    assert "succeeded" in out and f"resumed from {path} (step {done}/{STEPS} done)" in out
    assert steps_in(run) == steps_in(run, "ledger.jsonl") == list(range(STEPS))
    ledger = [rec["prompts"] for rec in records(run, "ledger.jsonl")]
    assert ledger == expected_ledger(tiny_models, run)
    trained = [p for step in ledger for p in step]
    assert len(trained) == len(set(trained)) == STEPS * BATCH  # every prompt exactly once
