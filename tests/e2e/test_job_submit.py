"""`ray job submit` against a local head on loopback, as the README shows it, on one head, in
one stop, kill and resume story (each run costs a stack start, ~45 s of the CI budget):

- the first job builds the tiny models itself (`make_tiny_models`, an absolute path the model
  paths point under) inside Ray's copy of the working dir, as a user's first job on a fresh
  cluster would;
- `ray job stop` on that running job (RAY_JOB_STOP_WAIT_TIME_S in its runtime env, as the README
  says) ends it STOPPED after the driver's graceful stop: the step finishes, a complete checkpoint
  is written, no final policy. Resubmitted with `--resume` (reusing the built models), the job
  runs on; its driver is SIGKILLed while it writes its next checkpoint (the fault matrix's
  "driver killed mid-checkpoint": the half-written `step_N.tmp/` is never loaded). Resubmitted
  again with `--resume`, the job continues from the stopped run's checkpoint and runs to
  SUCCEEDED, and the ledger holds every step once with the prompts an uninterrupted run draws;
- exact resume: a last job, never stopped, gives the resumed run's metrics (every number that
  is not a timing), bit-for-bit its final policy weights and its ledger. The adaptive KL
  controller, reward normalisation and a decaying LR schedule are on, so their restored states
  are checked too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
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
STEPS, BATCH = 6, 16
BUILT = "tiny tiny models (LlamaForCausalLM)"  # make_tiny's line
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


def built_models(root: Path) -> dict[str, Path]:
    """Where `make_tiny_models=root` puts the models (rayrlhf.models.tiny.make_tiny's layout)."""
    return {role: root / role for role in ("policy", "critic", "reward")}


def tiny_sets(models: Path, run_dir: Path) -> list[str]:
    """The job's run: its models built into (or reused from) `models` by the job itself."""
    sets = tiny_ppo_sets(built_models(models), run_dir, STEPS, BATCH)
    sets = [f"make_tiny_models={models}" if s.startswith("make_tiny_models=") else s for s in sets]
    return [
        *sets,
        "policy.lr_schedule=linear",
        f"policy.lr_total_steps={STEPS * 2 * 2}",  # steps x ppo_epochs x num_mini_batches
        "algorithm.kl_controller=adaptive",
        "algorithm.kl_target=0.5",
        "algorithm.reward_normalize=true",
    ]


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


def numbers(run_dir: Path) -> list[dict]:
    """metrics.jsonl without what depends on the clock."""
    timing = ("time/", "busy/", "perf/tokens_per_sec", "perf/total_tokens_per_sec")
    late = ("_seconds", "per_sec", "overhead", "eval/seconds")
    return [
        {k: v for k, v in rec.items() if not k.startswith(timing) and not k.endswith(late)}
        for rec in records(run_dir, "metrics.jsonl")
    ]


def expected_ledger(models: Path, run_dir: Path) -> list[list[int]]:
    """The prompt indices an uninterrupted run trains on, step by step."""
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", tiny_sets(models, run_dir))
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy.model_path)
    prompts = PromptSet.load(cfg.data, tokenizer, cfg.seed, context_limit(cfg))
    assert len(prompts) >= STEPS * BATCH  # one epoch: a repeated prompt would be a replay
    return [prompts.indices(step, BATCH) for step in range(STEPS)]


def stop_job(env, address: str, sid: str, models: Path, run: Path, log: Path) -> Path:
    """Submit the run, `ray job stop` it once 2 steps are logged; its checkpoint, checked."""
    first = submit(env, address, sid, train_cmd(*tiny_sets(models, run)), log)
    wait_for_steps(first, run, 2, log)  # past the step-2 checkpoint's start
    stop = _ray("job", "stop", "--address", address, sid, env=env, timeout=900)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    first.wait(timeout=120)
    status = _ray("job", "status", "--address", address, sid, env=env)
    # The CLI's words for JobStatus.STOPPED (FAILED would be "Job '...' failed").
    assert f"Job '{sid}' was stopped" in status.stdout, status.stdout + status.stderr
    logs = _ray("job", "logs", "--address", address, sid, env=env).stdout
    assert f"{BUILT} in {models}.tmp" in logs, logs[-4000:]  # the job built them
    assert all((path / "config.json").is_file() for path in built_models(models).values())
    line = re.search(STOP_LINE, logs)
    assert line and "rayrlhf: SIGTERM received" in logs, logs[-4000:]
    done, path = int(line[1]), Path(line[2])
    assert 2 <= done < STEPS and path == run / "checkpoints" / f"step_{done}", logs[-4000:]
    assert verify(path)["step"] == done and newest_complete(run) == path
    assert steps_in(run) == steps_in(run, "ledger.jsonl") == list(range(done))
    assert not (run / "policy").exists()  # a stopped run leaves no final policy
    return path


def _drivers(run: Path) -> list[int]:
    """The job's entrypoint processes for `run` (not `ray job submit`, which names it too)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:
            continue
        line = b" ".join(argv)
        if b"rayrlhf.cli train" in line and str(run).encode() in line and b"submit" not in argv:
            pids.append(int(proc.name))
    return pids


def kill_mid_checkpoint(env, address: str, sid: str, cmd: list[str], run: Path, log: Path):
    """Submit `cmd`; SIGKILL its driver once a checkpoint being written (`step_N.tmp/`) has its
    first file (the ranks write theirs first; the driver's state and the manifest follow)."""
    job, ckpts = submit(env, address, sid, cmd, log), run / "checkpoints"
    deadline, partial = time.monotonic() + 900, []
    while not partial:
        assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        partial = [f for d in ckpts.glob("step_*.tmp") for f in d.rglob("*") if f.is_file()]
        time.sleep(0.005)
    for pid in _drivers(run):
        os.kill(pid, signal.SIGKILL)
    assert job.wait(timeout=300) != 0, log.read_text()[-4000:]
    status = _ray("job", "status", "--address", address, sid, env=env)
    assert f"Job '{sid}' failed" in status.stdout, status.stdout + status.stderr
    (tmp,) = {f.relative_to(ckpts).parts[0] for f in partial}
    # Killed in the write: a part of it on disk, never named step_N.
    assert not (ckpts / tmp.removesuffix(".tmp")).exists() and (ckpts / tmp).is_dir()


def run_job(env, address: str, sid: str, cmd: list[str], log: Path) -> str:
    """Submit `cmd`, wait for SUCCEEDED; the job's log."""
    job = submit(env, address, sid, cmd, log)
    assert job.wait(timeout=900) == 0, log.read_text()[-4000:]
    out = log.read_text()
    assert "succeeded" in out and f"step {STEPS}/{STEPS}" in out, out[-4000:]
    assert BUILT not in out  # the models the first job built are reused
    return out


def test_job_stop_kill_and_resume_equal_an_uninterrupted_run(head, tmp_path):
    env, address = head
    run, models = tmp_path / "run", tmp_path / "models"  # absolute: the job's cwd is Ray's copy
    path = stop_job(env, address, "rr-stop", models, run, tmp_path / "1")
    done = verify(path)["step"]

    again = train_cmd(*tiny_sets(models, run)) + ["--resume"]
    kill_mid_checkpoint(env, address, "rr-kill", again, run, tmp_path / "2")
    assert newest_complete(run) == path  # the stopped run's checkpoint is the newest whole one
    out = run_job(env, address, "rr-resume", again, tmp_path / "3")
    assert f"resumed from {path} (step {done}/{STEPS} done)" in out, out[-4000:]
    # The killed run's lines past the checkpoint are dropped: every step once.
    assert steps_in(run) == steps_in(run, "ledger.jsonl") == list(range(STEPS))
    ledger = [rec["prompts"] for rec in records(run, "ledger.jsonl")]
    assert ledger == expected_ledger(models, run)
    trained = [p for step in ledger for p in step]
    assert len(trained) == len(set(trained)) == STEPS * BATCH  # every prompt exactly once
    # The kept checkpoints: the last two complete ones (keep_last=2), no leftover .tmp.
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept[-1] == f"step_{STEPS}" and len(kept) == 2, kept
    assert os.path.getsize(run / "checkpoints" / f"step_{STEPS}" / "driver.json") > 0

    whole = tmp_path / "whole"
    run_job(env, address, "rr-whole", train_cmd(*tiny_sets(models, whole)), tmp_path / "4")
    assert numbers(run) == numbers(whole)
    assert records(run, "ledger.jsonl") == records(whole, "ledger.jsonl")
    a, b = (load_file(d / "policy/model.safetensors") for d in (whole, run))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
