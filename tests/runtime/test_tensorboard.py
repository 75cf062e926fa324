"""TensorBoard: every numeric field of every metrics record goes to event files in the run
directory, read back here with TensorBoard's own reader."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rayrlhf.runtime.run_dir import MetricsWriter, read_metrics


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_every_metric_is_written_and_read_back(tmp_path):
    log = MetricsWriter(tmp_path)  # on by default, as metrics.tensorboard is
    log.write({"step": 0, "rollout/reward_mean": 0.25, "sync/bytes": 4_000_000, "epoch": 0})
    log.write({"step": 1, "rollout/reward_mean": 0.5, "sync/bytes": 4_000_000, "epoch": 0,
               "eval/reward_mean": 0.75, "note": "text stays in metrics.jsonl"})  # fmt: skip
    # No close(): each record is flushed as written, so a run that dies keeps its steps.
    got = _scalars(tmp_path)
    assert got["rollout/reward_mean"] == [(0, 0.25), (1, 0.5)]
    assert got["sync/bytes"] == [(0, 4e6), (1, 4e6)]
    assert got["eval/reward_mean"] == [(1, 0.75)]
    assert set(got) == {"rollout/reward_mean", "sync/bytes", "epoch", "eval/reward_mean"}
    assert read_metrics(tmp_path)[1]["note"] == "text stays in metrics.jsonl"
    log.close()


def test_a_new_run_in_the_same_directory_starts_afresh(tmp_path):
    first = MetricsWriter(tmp_path)
    first.write({"step": 0, "loss/policy": 1.0})
    first.close()
    second = MetricsWriter(tmp_path)
    second.write({"step": 0, "loss/policy": 2.0})
    second.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    assert _scalars(tmp_path)["loss/policy"] == [(0, 2.0)]


def test_off_writes_metrics_jsonl_only(tmp_path):
    log = MetricsWriter(tmp_path, tensorboard=False)
    log.write({"step": 0, "loss/policy": 1.0})
    assert not list(tmp_path.glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 0, "loss/policy": 1.0}


def test_records_without_a_step_are_numbered_in_order(tmp_path):
    log = MetricsWriter(tmp_path)
    for value in (3.0, 4.0):
        log.write({"x": value, "flag": True})
    assert _scalars(tmp_path)["x"] == [(0, 3.0), (1, 4.0)]
    assert _scalars(tmp_path)["flag"] == [(0, 1.0), (1, 1.0)]
    log.close()


@pytest.mark.parametrize("on", [True, False])
def test_the_default_is_the_metrics_config_default(on, tmp_path):
    from rayrlhf.config import MetricsConfig

    assert MetricsConfig().tensorboard is True
    MetricsWriter(tmp_path, tensorboard=on).write({"step": 0, "x": 1.0})
    assert bool(list(tmp_path.glob("events.out.tfevents.*"))) is on
