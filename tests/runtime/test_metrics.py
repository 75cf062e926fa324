"""Metrics: the step record, orchestration overhead, the Prometheus endpoint and the dashboard."""

from __future__ import annotations

import json
import re
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rayrlhf.algorithms.experience import RolloutStats
from rayrlhf.runtime.metrics import PhaseTimer, PrometheusMetrics, step_record
from rayrlhf.runtime.plots import write_plots
from rayrlhf.types import SyncResult, TrainStats

ROOT = Path(__file__).resolve().parents[2]


def _timer(generate=2.0, score=1.0, advantage=0.1, train=3.0, sync=0.5) -> PhaseTimer:
    t = PhaseTimer()
    t.seconds = {
        "generate": generate,
        "score": score,
        "advantage": advantage,
        "train": train,
        "sync": sync,
    }
    t.busy = {
        "generate": 1.8,
        "reward": 0.2,
        "reference": 0.6,
        "old_logprobs": 0.9,
        "critic": 0.5,
        "train_policy": 2.7,
        "train_critic": 1.0,
    }
    return t


def _record(step: int, timer: PhaseTimer, tokens: int = 100) -> dict:
    stats = RolloutStats(
        reward_mean=0.5,
        reward_std=0.1,
        kl=0.2,
        response_length=10.0,
        tokens=tokens,
        total_tokens=3 * tokens,
        explained_variance=0.3,
        engine_logprob_diff=1e-6,
    )
    sync = SyncResult("ab" * 32, num_bytes=4_000_000, num_tensors=21, num_buckets=2)
    return step_record(
        step, stats, TrainStats(loss=0.1), TrainStats(loss=0.2), sync, timer, ppo_epochs=2
    )


def test_orchestration_overhead_is_step_minus_busiest_role_per_phase():
    t = _timer()
    # Critical path by hand: generate 1.8 + score max(0.2, 0.6, 0.9, 0.5) = 0.9 + advantage
    # 0.1 (wall) + train max(2.7, 1.0) = 2.7 + sync 0.5 (wall) = 6.0; step = 6.6 s.
    assert t.critical_path == pytest.approx(6.0)
    rec = _record(0, t)
    assert rec["perf/orchestration_overhead"] == pytest.approx(1 - 6.0 / 6.6)
    assert rec["perf/tokens_per_sec"] == pytest.approx(100 / 6.6)
    assert rec["perf/tokens_trained"] == 600  # 300 tokens x 2 epochs
    assert rec["busy/train_policy"] == 2.7 and rec["time/sync"] == 0.5
    assert rec["sync/hashed"] == 1.0 and rec["sync/bytes"] == 4_000_000


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" not in s.labels:
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_prometheus_endpoint_counts_match_steps():
    prom = PrometheusMetrics("127.0.0.1", 0)
    try:
        for step in range(3):
            prom.observe(_record(step, _timer()), _timer(), Counter({0: 60, 1: 40}))
        got = _scrape(prom.url)
    finally:
        prom.close()
    assert got["rayrlhf_steps_total"] == 3
    assert got["rayrlhf_tokens_generated_total"] == 300
    assert got["rayrlhf_tokens_trained_total"] == 3 * 600
    assert got["rayrlhf_engine_tokens_generated_total{engine=0}"] == 180
    assert got["rayrlhf_engine_tokens_generated_total{engine=1}"] == 120
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
        assert got[f"rayrlhf_phase_seconds_count{{phase={phase}}}"] == 3, phase
    assert got["rayrlhf_phase_seconds_sum{phase=train_policy}"] == pytest.approx(3 * 2.7)
    assert got["rayrlhf_sync_bytes_count"] == 3


def test_grafana_dashboard_queries_only_exported_metrics():
    dash = json.loads((ROOT / "deploy" / "monitoring" / "grafana-dashboard.json").read_text())
    prom = PrometheusMetrics("127.0.0.1", 0)
    try:
        prom.observe(_record(0, _timer()), _timer(), Counter({0: 1}))
        text = urllib.request.urlopen(prom.url, timeout=5).read().decode()
        exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    finally:
        prom.close()
    assert dash["panels"]
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = re.findall(r"rayrlhf_[a-z_]+", target["expr"])
            assert names, target["expr"]
            for name in names:
                assert name in exported, (panel["title"], name)


def test_run_report_plots_are_pngs(tmp_path):
    t = _timer()
    lines = [json.dumps(_record(step, t, tokens=100 + step)) for step in range(5)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    paths = write_plots(tmp_path)
    assert {p.name for p in paths} == {"reward.png", "kl.png", "tokens_per_sec.png"}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


EVAL = {"eval/reward_mean": 0.42, "eval/response_length": 7.5, "eval/num_prompts": 8}


def test_prometheus_exports_eval_gauges_from_the_first_evaluation_on():
    prom = PrometheusMetrics("127.0.0.1", 0)
    try:
        prom.observe(_record(0, _timer()), _timer(), Counter())
        before = _scrape(prom.url)
        prom.observe({**_record(1, _timer()), **EVAL}, _timer(), Counter())
        prom.observe(_record(2, _timer()), _timer(), Counter())  # not evaluating: kept
        after = _scrape(prom.url)
    finally:
        prom.close()
    assert not any(k.startswith("rayrlhf_eval_") for k in before)  # no eval yet: no gauge at 0
    assert after["rayrlhf_eval_reward_mean"] == 0.42
    assert after["rayrlhf_eval_response_length"] == 7.5
    assert "rayrlhf_eval_accuracy" not in after  # the reward reported none


def test_step_log_prints_an_eval_line_on_evaluating_steps(tmp_path):
    import io

    from rayrlhf.runtime.metrics import StepLog

    out = io.StringIO()
    log = StepLog(tmp_path, 2, stream=out, tensorboard=False)
    log.write(_record(0, _timer()))
    log.write({**_record(1, _timer()), **EVAL, "eval/seconds": 1.25})
    log.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[2] == (
        "eval after step 2 | reward +0.420 | len 7.5 | 8 prompts | 1.2s"
    )
    assert not list(tmp_path.glob("events.out.tfevents.*"))  # tensorboard=False: no files


def test_eval_reward_is_plotted_at_the_evaluating_steps_only(tmp_path):
    t = _timer()
    recs = [{**_record(s, t), **(EVAL if s % 2 else {})} for s in range(5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    paths = write_plots(tmp_path)
    assert "eval_reward.png" in {p.name for p in paths}
    assert (tmp_path / "eval_reward.png").read_bytes()[:4] == b"\x89PNG"
