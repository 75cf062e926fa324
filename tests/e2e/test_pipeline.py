"""`rayrlhf pipeline`: SFT -> RM -> PPO on the tiny models, judged by the gold rule.

The gold scorer (the demo task's rule) never trains anything; it only judges the SFT and PPO
policies' greedy outputs, so reward hacking of the learned RM would show here. KL bound stated:
the final KL to the reference stays below 10 nats per sequence (measured: ~2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
KL_BOUND = 10.0


def test_pipeline_raises_the_gold_score_over_sft(tiny_models, tmp_path):
    run_dir = tmp_path / "pipe"
    cmd = [
        sys.executable, "-m", "rayrlhf.cli", "pipeline",
        "--config", "configs/tiny-cpu-pipeline.yaml",
        "--set", f"run_dir={run_dir}", "--set", "make_tiny_models=null",
        "--set", f"sft.model_path={tiny_models['policy']}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "pipeline report" in proc.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["rm_eval_accuracy"] >= 0.9
    assert report["gold_score_ppo_greedy"] > report["gold_score_sft_greedy"] + 0.05, report
    assert report["final_kl"] < KL_BOUND
    for stage in ("sft", "rm", "ppo"):
        assert (run_dir / stage / "metrics.jsonl").exists(), stage
