"""`rayrlhf pipeline`: SFT -> RM -> PPO on the tiny models, judged by the gold rule.

The gold scorer (the demo task's rule, `eval.gold`) never trains anything; it scores the same
greedy held-out responses as the proxy (the learned RM) before PPO and at every evaluation, so
reward hacking of the RM would show in the report's series. KL bound stated: the final KL to
the reference stays below 10 nats per sequence (measured: ~2).
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
PLOTS = ("eval_gold.png", "overoptimisation.png", "eval_length.png")


def report_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("pipeline report"))


def names(report: dict) -> set[str]:
    return {Path(p).name for p in report["plots"]}


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
    print(proc.stdout[proc.stdout.index("pipeline report") :])  # the figures, with -s
    report = json.loads((run_dir / "report.json").read_text())
    assert report["rm_eval_accuracy"] >= 0.9
    ev = report["eval"]
    assert ev["step"] == [0, 5, 10, 15, 20, 25, 30, 35, 40]  # before PPO, then every 5 steps
    assert report["gold_key"] == "eval/gold"
    for key in ("proxy", "gold", "response_length", "kl"):
        assert len(ev[key]) == 9 and all(x is not None for x in ev[key]), key
    assert ev["kl"][0] < 0.05  # the SFT policy is the reference
    assert ev["gold"][-1] > ev["gold"][0] + 0.05, report  # PPO on the RM raised the gold score
    assert report["final_kl"] < KL_BOUND
    assert "held-out eval on 64 prompts, before PPO -> after step 40" in report_line(proc.stdout)
    assert set(PLOTS) <= names(report)
    assert (report["overoptimisation_warning"] is None) == (
        "WARNING reward over-optimisation" not in proc.stdout
    )
    for stage in ("sft", "rm", "ppo"):
        assert (run_dir / stage / "metrics.jsonl").exists(), stage
