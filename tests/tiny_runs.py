"""`--set` overrides for a PPO run of the tiny stack (the `tiny_models` fixture) with
checkpoints and without the metrics server, plots or event files: the runs that stop, die and
resume in tests/e2e and tests/faults. tests/ is on sys.path (tests/conftest.py is there)."""

from __future__ import annotations

import time
from pathlib import Path


def tiny_ppo_sets(
    tiny_models, run_dir: Path, steps: int, batch: int = 16, checkpoint_every: int = 2
) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"steps={steps}",
        "make_tiny_models=null",
        f"policy.model_path={tiny_models['policy']}",
        f"critic.model_path={tiny_models['critic']}",
        f"reward.model_path={tiny_models['reward']}",
        f"algorithm.rollout_batch_size={batch}",
        "policy.micro_batch_size=4",
        "critic.micro_batch_size=4",
        f"checkpoint.every_steps={checkpoint_every}",
        "metrics.prometheus=false",
        "metrics.plots=false",
        "metrics.tensorboard=false",
    ]


def wait_while_running(cond, proc, what: str, log: Path, timeout: float = 600) -> None:
    """Poll `cond` until true; fail if the CLI process `proc` exits first or `timeout` passes,
    with the tail of its `log` (all a CI report shows of the run)."""
    deadline = time.monotonic() + timeout
    while not cond():
        tail = log.read_text()[-6000:] if log.exists() else ""
        assert proc.poll() is None, f"the run exited {proc.returncode} before {what}:\n{tail}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{tail}"
        time.sleep(0.2)
