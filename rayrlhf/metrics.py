"""Step metrics: one JSON line per step in run_dir/metrics.jsonl, and a progress line on stdout.

Names are grouped: rollout/, loss/, policy/, critic/, perf/, time/, sync/.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from rayrlhf.experience import RolloutStats
from rayrlhf.types import SyncResult, TrainStats


class PhaseTimer:
    """Wall-clock seconds per named phase of one step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def step_record(
    step: int,
    r: RolloutStats,
    pol: TrainStats,
    crt: TrainStats,
    sync: SyncResult,
    timer: PhaseTimer,
) -> dict[str, float]:
    """The flat metrics dict of one step (the schema of metrics.jsonl)."""
    rec = {
        "step": step,
        "rollout/reward_mean": r.reward_mean,
        "rollout/reward_std": r.reward_std,
        "rollout/kl": r.kl,
        "rollout/response_length": r.response_length,
        "rollout/engine_logprob_diff": r.engine_logprob_diff,
        "loss/policy": pol.loss,
        "loss/value": crt.loss,
        "policy/approx_kl": pol.approx_kl,
        "policy/clipfrac": pol.clipfrac,
        "policy/entropy": pol.entropy,
        "policy/grad_norm": pol.grad_norm,
        "critic/clipfrac": crt.clipfrac,
        "critic/explained_variance": r.explained_variance,
        "perf/tokens_generated": r.tokens,
        "perf/tokens_per_sec": r.tokens / max(timer.total, 1e-9),
        "perf/generate_tokens_per_sec": r.tokens / max(timer.seconds.get("generate", 0), 1e-9),
        "perf/step_seconds": timer.total,
        "sync/bytes": sync.num_bytes,
        "sync/buckets": sync.num_buckets,
        "sync/gb_per_sec": sync.num_bytes / 1e9 / max(timer.seconds.get("sync", 0), 1e-9),
    }
    rec.update({f"time/{k}": v for k, v in timer.seconds.items()})
    return rec


class StepLog:
    """Appends step records to metrics.jsonl and prints one readable line per step."""

    def __init__(self, run_dir: Path, total_steps: int, stream=sys.stdout) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.total = total_steps
        self.stream = stream
        self.start = time.perf_counter()

    def write(self, rec: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        done = rec["step"] + 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done)
        print(
            f"step {done}/{self.total} | reward {rec['rollout/reward_mean']:+.3f} "
            f"| kl {rec['rollout/kl']:.3f} | len {rec['rollout/response_length']:.1f} "
            f"| {rec['perf/tokens_per_sec']:.0f} tok/s | step {rec['perf/step_seconds']:.1f}s "
            f"(gen {rec['time/generate']:.1f} score {rec['time/score']:.1f} "
            f"train {rec['time/train']:.1f} sync {rec['time/sync']:.2f}) | eta {eta:.0f}s",
            file=self.stream,
            flush=True,
        )


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All step records of a run, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
