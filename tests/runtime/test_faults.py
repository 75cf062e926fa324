"""The one failure line, the error log, the restart budget and the sync drift alarm."""

from __future__ import annotations

import json
from pathlib import Path

from rayrlhf.algorithms.losses import ENGINE_LOGPROB_GAP_LIMITS, pair_gap_limit
from rayrlhf.cluster.errors import RoleFailed
from rayrlhf.config import load_config
from rayrlhf.runtime.faults import (
    ERRORS_LOG,
    RestartBudget,
    compute_dtypes,
    failure_line,
    gap_warning,
    log_failure,
    skip_line,
)
from rayrlhf.types import TrainStats


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


def test_gap_warning_only_over_the_limit_of_the_pair():
    limit = pair_gap_limit("float32", "bfloat16")
    assert limit == ENGINE_LOGPROB_GAP_LIMITS["bfloat16"]  # the looser end decides
    assert gap_warning(3, 0.05, limit) is None  # bf16 rounding: a correct sync
    line = gap_warning(3, 0.5, limit)
    assert line.startswith("rayrlhf: warning: step 4:") and "0.5" in line and "\n" not in line
    assert gap_warning(0, 2e-3, pair_gap_limit("float32", "float32"))  # fp32: 1e-3 is the limit


def test_compute_dtypes_read_the_checkpoint_when_auto(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    cfg = load_config(None, [f"policy.model_path={tmp_path}", "rollout.dtype=auto"])
    assert compute_dtypes(cfg) == ("float32", "bfloat16")  # CPU trainer, bf16 checkpoint
    cfg = load_config(None, [f"policy.model_path={tmp_path}", "rollout.dtype=float32"])
    assert compute_dtypes(cfg) == ("float32", "float32")


class _NoCheckpoints:
    def resume_point(self):
        return None


def test_skip_line_stops_at_the_streak_limit_of_either_trainer():
    ok, bad = TrainStats(loss=0.0, skip_streak=1.0), TrainStats(loss=0.0, skip_streak=3.0)
    assert skip_line(4, (ok, ok), 3, _NoCheckpoints()) is None
    line = skip_line(4, (ok, bad), 3, _NoCheckpoints())  # the critic's streak counts too
    assert line.startswith("rayrlhf: 3 optimizer steps in a row skipped at step 5")
    assert "fault.max_skipped_steps=3" in line and "last checkpoint: none" in line
