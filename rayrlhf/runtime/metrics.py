"""Step metrics: metrics.jsonl (one line per step) and TensorBoard, a progress line, and a
Prometheus endpoint.

Names are grouped: rollout/, loss/, policy/, critic/, perf/, time/ (wall seconds of each phase of
the driver), busy/ (compute seconds inside the slowest actor of each role), sync/, and eval/ on
the steps that evaluate (`rayrlhf.runtime.evaluation`).

Orchestration overhead is what the step costs beyond its critical path: step seconds minus, per
phase, the busiest role's compute seconds. It is the price of Ray, serialization and the driver.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter as Tally
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from rayrlhf.algorithms.experience import RolloutStats
from rayrlhf.config import ConfigError, MetricsConfig
from rayrlhf.runtime.run_dir import MetricsWriter
from rayrlhf.types import SyncResult, TrainStats

# Roles that run at the same time in one phase; the phase costs as much as the slowest of them.
CONCURRENT = {
    "generate": ("generate",),
    "score": ("reward", "reference", "old_logprobs", "critic"),
    "train": ("train_policy", "train_critic"),
}
EVAL_GAUGES = {
    "eval/reward_mean": "Mean reward on the held-out prompts, last evaluation",
    "eval/response_length": "Mean response tokens on the held-out prompts, last evaluation",
    "eval/accuracy": "Accuracy on the held-out prompts, last evaluation (rewards that judge it)",
}
"""Evaluation metrics exported as gauges `rayrlhf_eval_<name>`."""
PROMETHEUS_PHASES = (
    "generate",
    "reward",
    "reference",
    "old_logprobs",
    "critic",
    "advantage",
    "train_policy",
    "train_critic",
    "sync",
)


class PhaseTimer:
    """Wall seconds per phase of one step, and compute seconds per role reported by actors."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.busy: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def add_busy(self, role: str, seconds: float) -> None:
        self.busy[role] = self.busy.get(role, 0.0) + seconds

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    @property
    def critical_path(self) -> float:
        """Seconds the step would take with free orchestration: per phase, the slowest role."""
        out = 0.0
        for phase, wall in self.seconds.items():
            roles = CONCURRENT.get(phase)
            out += max(self.busy.get(r, 0.0) for r in roles) if roles else wall
        return out

    def phase_seconds(self) -> dict[str, float]:
        """Seconds per Prometheus phase: role compute where measured, else the wall phase."""
        merged = {**self.seconds, **self.busy}
        return {p: merged[p] for p in PROMETHEUS_PHASES if p in merged}


def step_record(
    step: int,
    r: RolloutStats,
    pol: TrainStats,
    crt: TrainStats,
    sync: SyncResult,
    timer: PhaseTimer,
    ppo_epochs: int = 1,
) -> dict[str, float]:
    """The flat metrics dict of one step (the schema of metrics.jsonl)."""
    total = max(timer.total, 1e-9)
    rec = {
        "step": step,
        "rollout/reward_mean": r.reward_mean,
        "rollout/reward_std": r.reward_std,
        "rollout/kl": r.kl,
        "rollout/response_length": r.response_length,
        "rollout/engine_logprob_diff": r.engine_logprob_diff,
        "rollout/engine_logprob_gap_mean": r.engine_logprob_gap_mean,
        "loss/policy": pol.loss,
        "loss/value": crt.loss,
        "policy/approx_kl": pol.approx_kl,
        "policy/clipfrac": pol.clipfrac,
        "policy/entropy": pol.entropy,
        "policy/grad_norm": pol.grad_norm,
        # Optimizer steps skipped (non-finite loss or gradient): stats are means over epochs.
        "policy/skipped_steps": pol.skipped * ppo_epochs,
        "critic/clipfrac": crt.clipfrac,
        "critic/skipped_steps": crt.skipped * ppo_epochs,
        "critic/explained_variance": r.explained_variance,
        "perf/tokens_generated": r.tokens,
        "perf/total_tokens": r.total_tokens,
        "perf/tokens_trained": r.total_tokens * ppo_epochs,
        "perf/tokens_per_sec": r.tokens / total,
        "perf/total_tokens_per_sec": r.total_tokens / total,
        "perf/generate_tokens_per_sec": r.tokens / max(timer.seconds.get("generate", 0), 1e-9),
        "perf/step_seconds": timer.total,
        "perf/orchestration_overhead": max(0.0, 1 - timer.critical_path / total),
        "sync/bytes": sync.num_bytes,
        "sync/buckets": sync.num_buckets,
        "sync/hashed": float(sync.hashed),  # 1 on the syncs that checked every byte
        "sync/gb_per_sec": sync.num_bytes / 1e9 / max(timer.seconds.get("sync", 0), 1e-9),
    }
    rec.update({f"time/{k}": v for k, v in timer.seconds.items()})
    rec.update({f"busy/{k}": v for k, v in timer.busy.items()})
    return rec


class StepLog:
    """Appends step records to metrics.jsonl and prints one readable line per step."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        stream=None,
        tensorboard: bool = MetricsConfig().tensorboard,
    ) -> None:
        self.out = MetricsWriter(run_dir, tensorboard)
        self.total = total_steps
        self.stream = stream
        self.start = time.perf_counter()

    def write(self, rec: dict[str, float]) -> None:
        self.out.write(rec)
        done = rec["step"] + 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done)
        print(
            f"step {done}/{self.total} | reward {rec['rollout/reward_mean']:+.3f} "
            f"| kl {rec['rollout/kl']:.3f} | len {rec['rollout/response_length']:.1f} "
            f"| {rec['perf/tokens_per_sec']:.0f} tok/s | step {rec['perf/step_seconds']:.1f}s "
            f"(gen {rec['time/generate']:.1f} score {rec['time/score']:.1f} "
            f"train {rec['time/train']:.1f} sync {rec['time/sync']:.2f}) | eta {eta:.0f}s",
            file=self.stream or sys.stdout,  # looked up now: callers may redirect stdout
            flush=True,
        )
        if "eval/reward_mean" in rec:
            print(
                f"eval after step {done} | reward {rec['eval/reward_mean']:+.3f} "
                f"| len {rec['eval/response_length']:.1f} | {rec['eval/num_prompts']} prompts "
                f"| {rec['eval/seconds']:.1f}s",
                file=self.stream or sys.stdout,
                flush=True,
            )

    def close(self) -> None:
        self.out.close()


class _AtomicRegistry(CollectorRegistry):
    """A registry whose scrapes never see half of a step's updates."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def collect(self):
        with self.lock:
            metrics = list(super().collect())
        yield from metrics


class PrometheusMetrics:
    """The driver's /metrics endpoint (prometheus-client), on its own registry."""

    def __init__(self, host: str, port: int) -> None:
        self.registry = reg = _AtomicRegistry()
        self.tokens_generated = Counter(
            "rayrlhf_tokens_generated", "Response tokens generated", registry=reg
        )
        self.tokens_trained = Counter(
            "rayrlhf_tokens_trained", "Tokens read by policy training passes", registry=reg
        )
        self.engine_tokens = Counter(
            "rayrlhf_engine_tokens_generated",
            "Tokens generated per vLLM engine",
            ["engine"],
            registry=reg,
        )
        self.engines_alive = Gauge(
            "rayrlhf_engines_alive", "vLLM engines serving, last step", registry=reg
        )
        self.engine_restarts = Gauge(
            "rayrlhf_engine_restarts", "vLLM engines replaced after a death or hang", registry=reg
        )
        self.steps = Counter("rayrlhf_steps", "Completed RL steps", registry=reg)
        self.tokens_per_sec = Gauge(
            "rayrlhf_tokens_per_sec", "Generated tokens/s, last step", registry=reg
        )
        self.reward = Gauge("rayrlhf_reward_mean", "Mean reward, last step", registry=reg)
        self.kl = Gauge("rayrlhf_kl", "KL to the reference per sequence, last step", registry=reg)
        self.length = Gauge(
            "rayrlhf_response_length", "Mean response tokens, last step", registry=reg
        )
        self.eval: dict[str, Gauge] = {}
        """eval/* gauges, made at their first value: a gauge never set would read 0."""
        self.phase_seconds = Histogram(
            "rayrlhf_phase_seconds",
            "Seconds per phase of a step",
            ["phase"],
            registry=reg,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.sync_bytes = Histogram(
            "rayrlhf_sync_bytes",
            "Bytes per weight sync",
            registry=reg,
            buckets=tuple(10.0**k for k in range(5, 13)),
        )
        self.server, self.thread = start_http_server(port, addr=host, registry=reg)
        self.url = f"http://{host}:{self.server.server_port}/metrics"

    def observe(self, rec: dict[str, float], timer: PhaseTimer, engines: Tally) -> None:
        """Record one step: `engines` counts the tokens each engine generated."""
        with self.registry.lock:
            self._observe(rec, timer, engines)

    def _observe(self, rec: dict[str, float], timer: PhaseTimer, engines: Tally) -> None:
        self.tokens_generated.inc(rec["perf/tokens_generated"])
        self.tokens_trained.inc(rec["perf/tokens_trained"])
        for engine, tokens in engines.items():
            self.engine_tokens.labels(engine=str(engine)).inc(tokens)
        self.tokens_per_sec.set(rec["perf/tokens_per_sec"])
        self.engines_alive.set(rec.get("rollout/engines_alive", 0))
        self.engine_restarts.set(rec.get("rollout/engine_restarts", 0))
        self.reward.set(rec["rollout/reward_mean"])
        self.kl.set(rec["rollout/kl"])
        self.length.set(rec["rollout/response_length"])
        for key, text in EVAL_GAUGES.items():
            if key in rec:  # an evaluating step
                if key not in self.eval:
                    name = f"rayrlhf_eval_{key.removeprefix('eval/')}"
                    self.eval[key] = Gauge(name, text, registry=self.registry)
                self.eval[key].set(rec[key])
        for phase, seconds in timer.phase_seconds().items():
            self.phase_seconds.labels(phase=phase).observe(seconds)
        self.sync_bytes.observe(rec["sync/bytes"])
        self.steps.inc()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(cfg: MetricsConfig) -> PrometheusMetrics:
    """Start the driver's /metrics server; a port that cannot be bound is a config error."""
    try:
        server = PrometheusMetrics(cfg.host, cfg.port)
    except OSError as err:
        raise ConfigError(
            f"invalid config:\n  metrics.port: cannot serve on {cfg.host}:{cfg.port}: {err}"
        ) from None
    print(f"prometheus metrics: {server.url}", flush=True)
    return server
