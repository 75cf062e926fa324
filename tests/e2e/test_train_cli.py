"""The main command's run, through the CLI: PPO learns the demo task and leaves a usable run dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from rayrlhf.cluster.rendezvous import free_port

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


def _scrape_while(proc: subprocess.Popen, url: str) -> list[dict[str, float]]:
    """Scrape /metrics every 0.3 s until the run exits; unlabelled and phase-count samples."""
    scrapes = []
    while proc.poll() is None:
        try:
            text = urllib.request.urlopen(url, timeout=2).read().decode()
        except OSError:  # not up yet, or already closed
            time.sleep(0.3)
            continue
        sample = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                phase = s.labels.get("phase")
                if not s.labels or (phase and s.name.endswith("_count")):
                    sample[f"{s.name}:{phase}" if phase else s.name] = s.value
        scrapes.append(sample)
        time.sleep(0.3)
    return scrapes


def test_ppo_learns_the_demo_task(tiny_models, tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
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
        "--set",
        f"metrics.port={port}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "stdout.txt"
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )
        try:
            scrapes = _scrape_while(proc, f"http://127.0.0.1:{port}/metrics")
            proc.wait(timeout=900)
        finally:
            proc.kill()
    stdout = log.read_text()
    assert proc.returncode == 0, stdout[-3000:]
    assert "step 40/40" in stdout  # progress a person can follow

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(40))
    for field in FIELDS:
        assert all(field in r for r in records), field
    rewards = [r["rollout/reward_mean"] for r in records]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    # Random init says a kind word ~4% of the time; the trained policy clearly more often.
    assert last > first + 0.1, (first, last)
    assert max(r["rollout/engine_logprob_diff"] for r in records) < 1e-3  # every sync was intact

    # Prometheus, scraped over HTTP during the run: counters agree with the steps logged.
    done = [s for s in scrapes if s.get("rayrlhf_steps_total", 0) >= 1]
    assert len(done) >= 5, f"only {len(done)} scrapes saw a finished step"
    last_scrape = max(done, key=lambda s: s["rayrlhf_steps_total"])
    n = int(last_scrape["rayrlhf_steps_total"])
    assert n >= 30
    for phase in (
        "generate",
        "reward",
        "reference",
        "critic",
        "advantage",
        "train_policy",
        "train_critic",
        "sync",
    ):
        assert last_scrape[f"rayrlhf_phase_seconds_count:{phase}"] == n, phase
    tokens = sum(r["perf/tokens_generated"] for r in records[:n])
    assert last_scrape["rayrlhf_tokens_generated_total"] == tokens
    assert last_scrape["rayrlhf_tokens_trained_total"] == sum(
        r["perf/tokens_trained"] for r in records[:n]
    )

    policy = AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    assert sum(p.numel() for p in policy.parameters()) > 0
    assert (run_dir / "config.yaml").exists()
    for png in ("reward.png", "kl.png", "tokens_per_sec.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG", png
