"""TensorBoard event files next to metrics.jsonl: every numeric field of every record, as a
scalar at the record's step (`tensorboard --logdir runs/` then shows each run directory as a
run, the pipeline's stages as runs/<name>/sft, rm, ppo).

A run starts its event files afresh, as it does metrics.jsonl: files a previous run left in the
same directory are removed, so two runs never draw over each other's curves. Each record is
flushed when written, so a run that dies keeps every step it logged.
"""

from __future__ import annotations

from pathlib import Path

EVENT_GLOB = "events.out.tfevents.*"


class TensorBoardWriter:
    """Scalars of metric records into run_dir's event files (torch's SummaryWriter)."""

    def __init__(self, run_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when on

        run_dir = Path(run_dir)
        for old in run_dir.glob(EVENT_GLOB):
            old.unlink()
        self.writer = SummaryWriter(log_dir=str(run_dir))
        self._count = 0

    def write(self, record: dict) -> None:
        """Each numeric field but `step` (booleans as 0/1) as a scalar at `record["step"]`, or
        at a running count without one; text and other values stay in metrics.jsonl only."""
        step = record.get("step", self._count)
        self._count += 1
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self.writer.add_scalar(key, float(value), global_step=int(step))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
