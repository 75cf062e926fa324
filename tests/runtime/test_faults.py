"""The one failure line, the error log and the restart budget."""

from __future__ import annotations

from pathlib import Path

from rayrlhf.cluster.waits import RoleFailed
from rayrlhf.runtime.faults import ERRORS_LOG, RestartBudget, failure_line, log_failure


def test_failure_line_names_role_rank_phase_step_and_checkpoint():
    fault = RoleFailed("policy", 1, "train", "died", "its process exited")
    line = failure_line(fault, 5, Path("runs/x/checkpoints/step_4"))
    assert line == (
        "rayrlhf: policy 1 died during train at step 5 (its process exited); "
        "last checkpoint: runs/x/checkpoints/step_4; resume with --resume"
    )
    assert "\n" not in line
    assert "at start-up" in failure_line(fault, None, None)
    assert "last checkpoint: none" in failure_line(fault, 1, None)


def test_log_failure_keeps_the_whole_chain(tmp_path):
    try:
        try:
            raise ValueError("remote traceback text")
        except ValueError as cause:
            raise RoleFailed("reward", 0, "score", "failed", "ValueError: ...") from cause
    except RoleFailed as fault:
        path = log_failure(tmp_path, "rayrlhf: reward 0 failed ...", fault)
    text = path.read_text()
    assert path.name == ERRORS_LOG and "rayrlhf: reward 0 failed" in text
    assert "remote traceback text" in text and "Traceback" in text


def test_restart_budget_counts_only_restartable_failures():
    budget = RestartBudget(1)
    assert not budget.take(RoleFailed("reward", 0, "score", "failed", "a bug"))
    assert budget.take(RoleFailed("rollout", 0, "generate", "hung", "no answer"))
    assert not budget.take(RoleFailed("policy", 0, "train", "died", "gone"))  # spent
    assert budget.used == 1
