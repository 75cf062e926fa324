"""The arithmetic recipe as the README runs it: SFT, then GRPO against the verifier, on CPU.

`rayrlhf pipeline --config configs/tiny-cpu-math.yaml`, unchanged but for where it writes. The
figure is greedy accuracy on the 200 held-out questions (in neither the SFT nor the RL set):
the "before PPO" evaluation is the SFT policy, the last one GRPO's. GRPO must add at least 10
points (issue 18). Measured 2026-12-02: see docs/rewards.md, "The arithmetic task".
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
GAIN = 0.10


def test_grpo_beats_sft_on_held_out_arithmetic(tmp_path):
    models, run_dir = tmp_path / "models", tmp_path / "math"
    cmd = [
        sys.executable, "-m", "rayrlhf.cli", "pipeline",
        "--config", "configs/tiny-cpu-math.yaml",
        "--set", f"run_dir={run_dir}", "--set", f"make_tiny_models={models}",
        "--set", f"sft.model_path={models / 'policy'}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    print(proc.stdout[proc.stdout.index("pipeline report") :])  # the figures, with -s
    report = json.loads((run_dir / "report.json").read_text())
    assert report["gold_key"] == "eval/reward/accuracy"  # the verifier, no reward model
    assert report["eval_prompts"] == 200
    ev = report["eval"]
    assert ev["step"][0] == 0 and ev["step"][-1] == 40  # before GRPO, then every 10 steps
    sft, grpo = ev["gold"][0], ev["gold"][-1]
    print(f"held-out accuracy: after SFT {sft:.3f}, after GRPO {grpo:.3f}")
    assert 0.05 < sft < 0.9  # SFT learned the task and left room
    assert grpo >= sft + GAIN, ev
    assert ev["kl"][0] < 0.05  # the SFT policy is the reference
    # Every held-out answer still ends in the `#### n` format GSM8K's checker reads.
    records = [json.loads(x) for x in (run_dir / "ppo/metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in records if "eval/reward/format_ok" in r][-1]
    assert last_eval["eval/reward/format_ok"] > 0.95
