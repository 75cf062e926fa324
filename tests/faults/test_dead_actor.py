"""Fault matrix rows "engine hung", "policy rank killed", "reward actor killed", for real.

One CLI launch of the tiny recipe with `fault.max_restarts: 1` and checkpoints every 2 steps:
  1. SIGSTOP of the vLLM engine (a hang): found within the adapted limit and replaced in place
     by the engine pool, the other roles untouched (issue 20's acceptance 4);
  2. SIGKILL of a policy ZeRO-3 rank: the driver rebuilds every role from the newest checkpoint;
  3. SIGKILL of the reward actor: no restart left, so one `rayrlhf:` line and exit 1.
Then `--resume` finishes the run. Nothing lost: every step's metrics and ledger line once, no
prompt twice. The processes are found among the CLI's descendants by Ray's process titles.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import psutil
import pytest
from tiny_runs import tiny_ppo_sets, wait_while_running

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS, BATCH = 8, 16
HANG_MIN_S = 20.0  # well above any phase of the tiny run, even on a loaded machine


def _cli(tiny_models, run_dir: Path, *extra: str) -> list[str]:
    sets = [
        *tiny_ppo_sets(tiny_models, run_dir, STEPS, BATCH),
        "fault.max_restarts=1",
        f"fault.hang_min_s={HANG_MIN_S}",
        "fault.hang_factor=5",
        "fault.hang_warmup=1",
        *extra,
    ]
    cmd = [sys.executable, "-m", "rayrlhf.cli", "train", "--config", "configs/tiny-cpu.yaml"]
    return cmd + [a for s in sets for a in ("--set", s)]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _actor_pids(driver: psutil.Process, title: str) -> list[int]:
    """PIDs of the driver's descendant Ray workers whose process title starts with `title`."""
    out = []
    for p in driver.children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith(title):
                out.append(p.pid)
        except psutil.Error:
            pass
    return sorted(out)


def test_hang_and_dead_actors_restart_then_one_line_and_resume(tiny_models, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "launch1.log"
    _wait = partial(wait_while_running, log=log)
    metrics = run_dir / "metrics.jsonl"
    with log.open("w") as out:
        proc = subprocess.Popen(
            _cli(tiny_models, run_dir), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
        driver = psutil.Process(proc.pid)
        try:
            _wait(lambda: len(_lines(metrics)) >= 3, proc, "step 3")
            (engine,) = _actor_pids(driver, "ray::RolloutEngine")
            stopped_at = time.monotonic()
            psutil.Process(engine).send_signal(signal.SIGSTOP)
            _wait(lambda: "(engine restart 1/" in log.read_text(), proc, "the hang's replacement")
            found_after = time.monotonic() - stopped_at

            _wait(lambda: _lines(metrics)[-1]["rollout/engine_restarts"] == 1, proc,
                  "a step after the replacement")  # fmt: skip
            ranks = _actor_pids(driver, "ray::PolicyWorker")
            assert len(ranks) == 2, ranks
            rank_killed_at = time.monotonic()
            psutil.Process(ranks[1]).kill()
            _wait(lambda: "(restart 1/1)" in log.read_text(), proc, "the dead rank's restart")
            rank_found_after = time.monotonic() - rank_killed_at
            _wait(lambda: re.search(r"\(restart 1/1\)[\s\S]*\nstep \d+/", log.read_text()),
                  proc, "a step after the restart")  # fmt: skip
            (reward,) = _actor_pids(driver, "ray::RewardWorker")
            killed_at = time.monotonic()
            psutil.Process(reward).kill()
            rc = proc.wait(timeout=120)
            ended_after = time.monotonic() - killed_at
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    hang = re.search(r"rayrlhf: rollout 0 hung during \w+ \(no answer in \d+s", text)
    dead = re.search(r"rayrlhf: policy [01] died during [\w -]+ at step \d+ \(", text)
    assert hang and dead, text[-4000:]
    # The hang is found within the adapted limit (~HANG_MIN_S here), not phase_timeout_s.
    assert found_after < HANG_MIN_S + 60, found_after
    assert rank_found_after < 60, rank_found_after  # its line, within a minute of the kill
    final = [x for x in text.splitlines() if x.startswith("rayrlhf:")][-1]
    assert rc == 1 and ended_after < 60, (rc, ended_after)
    assert re.fullmatch(
        r"rayrlhf: reward 0 died during \w+ at step \d+ \(.*\); last checkpoint: \S+step_\d+; "
        r"resume with --resume \(details: \S+errors\.log\)",
        final,
    ), final
    assert "Traceback" not in text, text[-4000:]  # tracebacks go to errors.log only
    assert "reward 0 died" in (run_dir / "errors.log").read_text()

    resumed = subprocess.run(
        _cli(tiny_models, run_dir, "resume=true"), cwd=ROOT, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert [r["step"] for r in _lines(metrics)] == list(range(STEPS))
    ledger = _lines(run_dir / "ledger.jsonl")
    prompts = [p for rec in ledger for p in rec["prompts"]]
    assert [r["step"] for r in ledger] == list(range(STEPS))
    assert len(prompts) == len(set(prompts)) == STEPS * BATCH
