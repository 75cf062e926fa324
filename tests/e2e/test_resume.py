"""Exact resume on the real stack: a run stopped by SIGTERM and resumed equals one never stopped.

Three launches of the tiny CPU recipe on one Ray: an uninterrupted 6-step run (in this process),
a CLI run sent SIGTERM during step 4 (it finishes the step, writes a checkpoint, exits 3), and
its `--resume` (in this process). The resumed run must give the uninterrupted run's metrics
(every number that is not a timing), bit-for-bit its final policy weights, and a ledger with
every prompt once. The adaptive KL controller, reward normalisation and a decaying LR schedule
are on, so their restored states are checked too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from safetensors.torch import load_file
from tiny_runs import tiny_ppo_sets

from rayrlhf.config import load_config
from rayrlhf.recipes.ppo import train
from rayrlhf.runtime.stop import EXIT_STOPPED

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


def overrides(tiny_models, run_dir: Path) -> list[str]:
    return [
        *tiny_ppo_sets(tiny_models, run_dir, STEPS),
        "policy.lr_schedule=linear",
        f"policy.lr_total_steps={STEPS * 2 * 2}",  # steps x ppo_epochs x num_mini_batches
        "algorithm.kl_controller=adaptive",
        "algorithm.kl_target=0.5",
        "algorithm.reward_normalize=true",
    ]


def numbers(run_dir: Path) -> list[dict]:
    """metrics.jsonl without what depends on the clock."""
    timing = ("time/", "busy/", "perf/tokens_per_sec", "perf/total_tokens_per_sec")
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.append(
            {
                k: v
                for k, v in rec.items()
                if not k.startswith(timing)
                and not k.endswith(("_seconds", "per_sec", "overhead", "eval/seconds"))
            }
        )
    return out


def ledger(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]


def stop_during_step_4(cmd: list[str], run_dir: Path, log: Path) -> subprocess.CompletedProcess:
    """Run the CLI; once 3 steps are recorded, SIGTERM it (as `ray job stop` does)."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.2)
        rc = proc.wait(timeout=600)
    return subprocess.CompletedProcess(cmd, rc, log.read_text())


@pytest.fixture(scope="module")
def shared_ray():
    ray.init(num_cpus=8, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_sigterm_then_resume_equals_an_uninterrupted_run(tiny_models, tmp_path, shared_ray):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    train(load_config(ROOT / "configs/tiny-cpu.yaml", overrides(tiny_models, whole)))

    cli = [sys.executable, "-m", "rayrlhf.cli", "train", "--config", "configs/tiny-cpu.yaml"]
    sets = [*overrides(tiny_models, stopped), f"ray_address={shared_ray}"]
    cmd = cli + [a for s in sets for a in ("--set", s)]
    first = stop_during_step_4(cmd, stopped, tmp_path / "first.log")
    line = re.search(
        r"rayrlhf: stopped by SIGTERM after step (\d+); checkpoint: (\S+); resume with --resume",
        first.stdout,
    )
    assert first.returncode == EXIT_STOPPED and line, first.stdout[-3000:]
    done, path = int(line[1]), Path(line[2])
    assert 3 <= done < STEPS and path == stopped / "checkpoints" / f"step_{done}"
    assert (path / "manifest.json").is_file() and not (stopped / "policy").exists()

    train(
        load_config(
            ROOT / "configs/tiny-cpu.yaml", [*overrides(tiny_models, stopped), "resume=true"]
        )
    )

    want, got = numbers(whole), numbers(stopped)
    assert [r["step"] for r in got] == list(range(STEPS))  # nothing repeated, nothing lost
    assert got == want
    a, b = (
        load_file(whole / "policy/model.safetensors"),
        load_file(stopped / "policy/model.safetensors"),
    )
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    prompts = [p for rec in ledger(stopped) for p in rec["prompts"]]
    assert [r["step"] for r in ledger(stopped)] == list(range(STEPS))
    assert len(prompts) == len(set(prompts)) == STEPS * 16 and ledger(stopped) == ledger(whole)
    # The kept checkpoints: the last two complete ones (keep_last=2), no leftover .tmp.
    kept = sorted(p.name for p in (stopped / "checkpoints").iterdir())
    assert kept[-1] == f"step_{STEPS}" and len(kept) == 2, kept
    assert os.path.getsize(stopped / "checkpoints" / f"step_{STEPS}" / "driver.json") > 0
