"""`--set` overrides for a PPO run of the tiny stack (the `tiny_models` fixture) with
checkpoints and without the metrics server, plots or event files: the runs that stop, die and
resume in tests/e2e and tests/faults. tests/ is on sys.path (tests/conftest.py is there)."""

from __future__ import annotations

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
