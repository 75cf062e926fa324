"""The main command's run, through the CLI: PPO learns the demo task and leaves a usable run dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FIELDS = [
    "step",
    "rollout/reward_mean",
    "rollout/reward_std",
    "rollout/kl",
    "policy/approx_kl",
    "policy/clipfrac",
    "loss/policy",
    "loss/value",
    "policy/entropy",
    "critic/explained_variance",
    "rollout/response_length",
    "perf/tokens_generated",
    "perf/tokens_per_sec",
    "time/generate",
    "time/score",
    "time/advantage",
    "time/train",
    "time/sync",
    "sync/bytes",
]


def test_ppo_learns_the_demo_task(tiny_models, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "rayrlhf.cli",
        "train",
        "--config",
        "configs/tiny-cpu.yaml",
        "--set",
        f"run_dir={run_dir}",
        "--set",
        "make_tiny_models=null",
        "--set",
        f"policy.model_path={tiny_models['policy']}",
        "--set",
        f"critic.model_path={tiny_models['critic']}",
        "--set",
        f"reward.model_path={tiny_models['reward']}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 40/40" in proc.stdout  # progress a person can follow

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(40))
    for field in FIELDS:
        assert all(field in r for r in records), field
    rewards = [r["rollout/reward_mean"] for r in records]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    # Random init says a kind word ~4% of the time; the trained policy clearly more often.
    assert last > first + 0.1, (first, last)
    assert max(r["rollout/engine_logprob_diff"] for r in records) < 1e-3  # every sync was intact

    policy = AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    assert sum(p.numel() for p in policy.parameters()) > 0
    assert (run_dir / "config.yaml").exists()
