"""Critic-free estimators and KL control on the real stack, through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RULE = "rayrlhf.data.demo_task:positive_word_fraction"


def _run(tiny_models, run_dir: Path, *overrides: str) -> tuple[str, list[dict]]:
    cmd = [
        sys.executable, "-m", "rayrlhf.cli", "train", "--config", "configs/tiny-cpu.yaml",
        "--set", f"run_dir={run_dir}", "--set", "make_tiny_models=null",
        "--set", f"policy.model_path={tiny_models['policy']}",
        "--set", f"critic.model_path={tiny_models['critic']}",
        "--set", "reward.model_path=null", "--set", f"reward.rule={RULE}",
        "--set", "metrics.port=0", "--set", "metrics.plots=false", "--set", "save_final=false",
    ]  # fmt: skip
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return proc.stdout, [json.loads(line) for line in lines]


def test_grpo_with_a_rule_reward_learns_without_a_critic(tiny_models, tmp_path):
    stdout, records = _run(
        tiny_models, tmp_path / "grpo", "steps=25", "algorithm.advantage=grpo",
        "algorithm.n_samples_per_prompt=4", "algorithm.kl_mode=loss",
        "algorithm.kl_estimator=k3", "algorithm.kl_coef=0.01",
        "policy.num_ranks=1",  # learning, not sharding (tests/e2e/test_stack.py shards)
    )  # fmt: skip
    started = next(line for line in stdout.splitlines() if line.startswith("starting roles"))
    assert "critic" not in started and "[grpo]" in started  # no critic actor, none reserved
    assert all(r["loss/value"] == 0.0 and "busy/critic" not in r for r in records)
    rewards = [r["rollout/reward_mean"] for r in records]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, (first, last)


def test_adaptive_kl_controller_holds_kl_near_target():
    """benchmarks/kl_control.py's adaptive run, 40 steps: over the second half (steps 20-39),
    KL stays within 2x of target. In the committed 60-step results all of steps 20-39 do (min
    1.97, max 5.44 for target 3) while a fixed beta's second half has a mean of ~10 and 8 of 20
    steps in the band, so both assertions still fail without the controller; they leave room
    for another CPU's rounding to move a step or two."""
    cmd = [sys.executable, "benchmarks/kl_control.py", "--no-baseline", "--steps", "40"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    low, high = out["band"]
    half = out["runs"]["adaptive"]["second_half"]
    assert low <= half["mean"] <= high, half
    assert half["fraction_in_band"] >= 0.9, half
    beta = out["runs"]["adaptive"]["beta"]
    assert max(beta) > 2 * beta[0]  # the controller acted, it did not just sit at its start
