"""A run's directory, as every recipe lays it out: config.yaml, metrics.jsonl, the demo models.

run_dir/config.yaml     the validated config, every default filled in
run_dir/metrics.jsonl   one JSON record per line (steps, evals), started afresh by each run
run_dir/events.out.tfevents.*   the same records for TensorBoard (metrics.tensorboard)
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from rayrlhf.config import MetricsConfig, Section
from rayrlhf.runtime.tensorboard import TensorBoardWriter


def build_tiny_models(directory: str | None) -> None:
    """Demo recipes: build the tiny models into `directory` unless they are already there."""
    if directory and not (Path(directory) / "policy" / "config.json").exists():
        from rayrlhf.models.tiny import make_tiny

        make_tiny(directory)


def write_run_config(cfg: Section, run_dir: str | Path) -> Path:
    """Create `run_dir` and record the validated config there; returns run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    (run_dir / "config.yaml").write_text(text)
    return run_dir


class MetricsWriter:
    """Appends one JSON record per line to run_dir/metrics.jsonl (emptied when opened) and, with
    `tensorboard`, writes its numbers to TensorBoard event files there too. Every command logs
    through here, so every command's metrics reach TensorBoard."""

    def __init__(
        self, run_dir: str | Path, tensorboard: bool = MetricsConfig().tensorboard
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.unlink(missing_ok=True)
        self.tensorboard = TensorBoardWriter(run_dir) if tensorboard else None

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        """Close the event files (each record is already flushed: closing is tidiness)."""
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl, in order."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
