"""What the driver says and keeps when an actor fails: one line on the screen, the whole Ray
error in run_dir/errors.log, and a restart budget (`fault.max_restarts`); and the alarm for a
weight sync that went wrong silently (the engines' logprobs drift from the trainer's).

    rayrlhf: policy 1 died during train at step 5 (its process exited); last checkpoint:
    runs/x/checkpoints/step_4; resume with --resume
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

from rayrlhf.algorithms.losses import ENGINE_LOGPROB_GAP_LIMITS
from rayrlhf.cluster.errors import RoleFailed
from rayrlhf.config import TrainConfig

ERRORS_LOG = "errors.log"
"""run_dir file that receives the full error (Ray's remote traceback) of every failure."""


class RunFailed(RuntimeError):
    """The run stopped on a failure; the message is the one line to print."""


def failure_line(fault: RoleFailed, step: int | None, checkpoint: Path | None) -> str:
    """The one line of a failure (step: 1-based number of the step it happened in)."""
    where = f" at step {step}" if step is not None else " at start-up"
    who = fault.role if fault.rank < 0 else f"{fault.role} {fault.rank}"
    return (
        f"rayrlhf: {who} {fault.kind} during {fault.phase}{where} ({fault.cause}); "
        f"last checkpoint: {checkpoint or 'none'}; resume with --resume"
    )


def log_failure(run_dir: Path, line: str, error: BaseException) -> Path:
    """Append `line` and `error`'s whole chain (Ray's text holds the remote traceback) to
    run_dir/errors.log; returns its path."""
    path = Path(run_dir) / ERRORS_LOG
    text = "".join(traceback.format_exception(error))
    with path.open("a") as f:
        f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n{text}\n")
    return path


class RestartBudget:
    """`fault.max_restarts` for one launch: whether a failure may be restarted from."""

    def __init__(self, max_restarts: int) -> None:
        self.max, self.used = max_restarts, 0

    def take(self, fault: RoleFailed) -> bool:
        """True (and one restart used) when `fault` is restartable and the budget has one."""
        if not fault.restartable or self.used >= self.max:
            return False
        self.used += 1
        return True


def compute_dtypes(cfg: TrainConfig) -> tuple[str, str]:
    """(trainer, engine) compute dtypes: DeepSpeed runs bf16 on GPU and fp32 on CPU; the engine
    runs rollout.dtype, 'auto' being the checkpoint's (config.json `dtype`/`torch_dtype`)."""
    trainer = "bfloat16" if cfg.policy.resources.num_gpus > 0 else "float32"
    engine = cfg.rollout.dtype
    if engine == "auto":
        conf = json.loads((Path(cfg.policy.model_path) / "config.json").read_text())
        engine = str(conf.get("dtype") or conf.get("torch_dtype") or "float32")
    return trainer, engine if engine in ENGINE_LOGPROB_GAP_LIMITS else "float32"


def gap_warning(step: int, gap_mean: float, limit: float) -> str | None:
    """A warning line when the step's mean engine/trainer logprob gap is over `limit`: the
    engines are not sampling from the weights the trainer scores with."""
    if gap_mean <= limit:
        return None
    return (
        f"rayrlhf: warning: step {step + 1}: engines' logprobs differ from the trainer's by "
        f"{gap_mean:.3g} a token on average (limit {limit:g} for these dtypes): a broken or "
        "stale weight sync? (docs/weight-sync.md#a-second-independent-check)"
    )


def skip_line(step: int, stats, limit: int, checkpoints) -> str | None:
    """The line that stops a run whose trainers (`stats`: their `TrainStats` of this step) have
    skipped `limit` optimizer steps in a row for a non-finite loss or gradient, else None. The
    weights are still the last applied step's (a skip changes nothing)."""
    streak = max(s.skip_streak for s in stats)
    if streak < limit:
        return None
    return (
        f"rayrlhf: {int(streak)} optimizer steps in a row skipped at step {step + 1} (a "
        f"non-finite loss or gradient; fault.max_skipped_steps={limit}); last checkpoint: "
        f"{checkpoints.resume_point() or 'none'}; resume with --resume once the cause is fixed"
    )
