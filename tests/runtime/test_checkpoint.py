"""Checkpoints without Ray: atomic write, rotation, driver state, resume compatibility.

The ranks' part is stood in for by a object that writes one torch file per group where the
DeepSpeed ranks would (the real ranks are exercised by tests/e2e/test_job_submit.py). Broken,
tampered and unwritable checkpoints are rows of the fault matrix:
tests/faults/test_checkpoint_faults.py, which shares the helpers here.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from rayrlhf.config import load_config
from rayrlhf.runtime.checkpoint import (
    CheckpointError,
    Checkpoints,
    check_compatible,
    complete,
    newest_complete,
    read_manifest,
    rotate,
    verify,
)


class FakeRanks:
    """Writes and reads `path/<group>/ds/state.pt` as the ZeRO-3 ranks do in DeepSpeed's layout."""

    def __init__(self) -> None:
        self.loaded: list[tuple[str, int]] = []

    def save_checkpoint(self, path: str) -> None:
        for group in ("policy", "critic"):
            (Path(path) / group / "ds").mkdir(parents=True)
            torch.save({"w": torch.arange(4.0), "step": 3}, Path(path) / group / "ds" / "state.pt")

    def load_checkpoint(self, path: str, steps_done: int) -> None:
        self.loaded.append((path, steps_done))


def config(tmp_path: Path, *overrides: str):
    return load_config(None, [f"run_dir={tmp_path}", "checkpoint.every_steps=2", *overrides])


def save(tmp_path: Path, step: int, cfg=None, dataset: str = "data-1") -> Path:
    ckpt = Checkpoints(cfg or config(tmp_path), tmp_path, dataset)
    ledger = [[step * 10 + i] for i in range(step)]
    return ckpt.save(step, FakeRanks(), {"kl": {"value": 0.1}, "moments": None, "ledger": ledger})


def test_save_is_complete_and_restores_the_driver_state(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n')
    path = save(tmp_path, 2)
    assert path.name == "step_2" and not list(path.parent.glob("*.tmp"))
    manifest = verify(path)
    assert manifest["step"] == 2 and manifest["world_sizes"] == {"policy": 2, "critic": 1}
    assert set(manifest["files"]) >= {"policy/ds/state.pt", "driver.json", "metrics.jsonl"}
    assert newest_complete(tmp_path) == path

    expected = (random.random(), torch.rand(3))  # what the RNGs give right after the save
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n')
    ranks = FakeRanks()
    state = Checkpoints(config(tmp_path), tmp_path, "data-1").restore(path, ranks)
    assert ranks.loaded == [(str(path), 2)]
    assert state["step"] == 2 and state["kl"] == {"value": 0.1} and state["ledger"] == [[20], [21]]
    assert (random.random(), *torch.rand(3).tolist()) == (expected[0], *expected[1].tolist())
    # Records after the checkpoint's step are dropped (a step 3 written after it would repeat).
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n{"step": 1}\n'


def test_rotation_keeps_the_last_good_checkpoint(tmp_path):
    cfg = config(tmp_path, "checkpoint.keep_last=1")
    save(tmp_path, 2, cfg)
    last_good = save(tmp_path, 4, cfg)
    assert complete(tmp_path) == [last_good]  # step_2 rotated away
    broken = tmp_path / "checkpoints" / "step_6"
    (broken / "policy").mkdir(parents=True)  # newer, but incomplete: does not count as kept
    (tmp_path / "checkpoints" / "step_8.tmp").mkdir()
    rotate(tmp_path, keep_last=1)
    assert complete(tmp_path) == [last_good] and last_good.is_dir()
    assert not (tmp_path / "checkpoints" / "step_8.tmp").exists()


def test_incompatible_resume_says_what_differs(tmp_path):
    path = save(tmp_path, 2)
    manifest = read_manifest(path)
    # How long, where and how watched may change.
    check_compatible(manifest, config(tmp_path, "steps=99", "resume=true"), "data-1")
    with pytest.raises(CheckpointError, match=r"policy\.lr: 0\.0005 -> 0\.001"):
        check_compatible(manifest, config(tmp_path, "policy.lr=1e-3"), "data-1")
    with pytest.raises(CheckpointError, match=r"ranks \{'policy': 2, 'critic': 1\}.*'policy': 4"):
        check_compatible(
            manifest, config(tmp_path, "policy.num_ranks=4", "policy.micro_batch_size=4"), "data-1"
        )
    with pytest.raises(CheckpointError, match="prompt set changed"):
        check_compatible(manifest, config(tmp_path), "data-2")
    resumed = Checkpoints(config(tmp_path, "algorithm.kl_coef=0.5"), tmp_path, "data-1")
    with pytest.raises(CheckpointError, match=r"algorithm\.kl_coef"):
        resumed.resume_point()
