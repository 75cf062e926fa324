"""The report's eval series, the over-optimisation warning rule and the eval plots, from
synthetic metrics.jsonl records (no Ray)."""

from __future__ import annotations

import json
import math

import pytest

from rayrlhf.runtime.plots import eval_series, gold_key, overoptimisation_warning, write_plots

PNG = b"\x89PNG\r\n\x1a\n"


def _series(proxy, gold):
    return {"step": [5 * i for i in range(len(proxy))], "proxy": proxy, "gold": gold}


@pytest.mark.parametrize(
    "proxy, gold, fires",
    [
        ([0.1, 0.5, 0.9], [0.2, 0.5, 0.3], True),  # gold peaked, fell 0.2, proxy kept rising
        ([0.1, 0.5, 0.9], [0.2, 0.5, 0.47], False),  # a fall within the tolerance: noise
        ([0.1, 0.9, 0.5], [0.2, 0.5, 0.3], False),  # the proxy fell too: not hacking it
        ([0.1, 0.5, 0.9], [0.2, 0.3, 0.5], False),  # gold at its best at the end
        ([0.1, 0.9], [0.5, 0.2], True),  # two evaluations are enough
        ([0.9], [0.1], False),  # one is not
        ([0.1, 0.5, 0.9], [0.5, math.nan, 0.3], True),  # a NaN gold is left out
        ([0.1, 0.9, 0.5], [0.5, 0.5, 0.4], True),  # a tie: the first best (proxy 0.1) counts
    ],
)
def test_the_warning_fires_when_gold_falls_from_its_best_while_the_proxy_rises(proxy, gold, fires):
    warning = overoptimisation_warning(_series(proxy, gold), tol=0.05)
    assert (warning is not None) == fires, warning


def test_the_warning_names_where_gold_peaked_and_both_ends():
    warning = overoptimisation_warning(_series([0.1, 0.5, 0.9], [0.2, 0.6, 0.3]))
    assert warning == (
        "WARNING reward over-optimisation: the gold score fell from 0.600 (after step 5) to "
        "0.300 (after step 10) while the proxy reward rose from 0.500 to 0.900; "
        "see overoptimisation.png"
    )
    assert overoptimisation_warning({"step": [0, 5], "proxy": [0.1, 0.9]}) is None  # no gold


def _records():
    """An at-start evaluation (step -1), 9 PPO steps, evaluations after steps 3, 6 and 9."""
    recs = [{"step": -1, "eval/reward_mean": 0.1, "eval/gold": 0.2, "eval/response_length": 16}]
    for s in range(9):
        rec = {"step": s, "rollout/reward_mean": s / 9, "rollout/kl": 0.5 * s}
        rec["perf/tokens_per_sec"] = 100.0
        if s % 3 == 2:
            rec |= {"eval/reward_mean": 0.3 * (s + 1) / 3, "eval/response_length": 12 - s}
            rec["eval/gold"] = {2: 0.4, 5: 0.6, 8: 0.3}[s]
        recs.append(rec)
    return recs


def test_eval_series_has_one_point_per_evaluation_with_the_kl_of_its_weights():
    series = eval_series(_records())
    assert series["step"] == [0, 3, 6, 9]  # steps done: 0 is before PPO
    assert series["proxy"] == pytest.approx([0.1, 0.3, 0.6, 0.9])
    assert series["gold"] == [0.2, 0.4, 0.6, 0.3]
    assert series["response_length"] == [16, 10, 7, 4]
    # The next step's rollout KL (what the evaluated weights generated); the last has no next.
    assert series["kl"] == [0.0, 1.5, 3.0, 4.0]
    assert "WARNING" in overoptimisation_warning(series)


def test_a_verifiable_tasks_accuracy_is_the_gold_without_eval_gold():
    recs = [{"step": 0, "eval/reward_mean": 0.5, "eval/reward/accuracy": 0.4}]
    assert gold_key(recs) == "eval/reward/accuracy"
    assert eval_series(recs)["gold"] == [0.4]
    assert gold_key([{"step": 0, "eval/reward_mean": 0.5}]) is None
    assert "gold" not in eval_series([{"step": 0, "eval/reward_mean": 0.5}])


def test_eval_plots_are_written_from_the_records(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    names = {p.name for p in write_plots(tmp_path)}
    assert {"eval_gold.png", "overoptimisation.png", "eval_length.png"} <= names
    for name in ("eval_gold.png", "overoptimisation.png", "eval_length.png", "reward.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, name


def test_no_evaluations_no_eval_plots(tmp_path):
    recs = [r for r in _records() if r["step"] >= 0]
    recs = [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in recs]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    names = {p.name for p in write_plots(tmp_path)}
    assert names == {"reward.png", "kl.png", "tokens_per_sec.png"}
