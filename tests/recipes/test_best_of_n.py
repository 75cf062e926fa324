"""Best-of-N selection on engine samples, and the roles it starts with Ray faked (the actors
are exercised in tests/e2e/)."""

import json
import math
import types

import torch

from rayrlhf.cluster import actors as actors_module
from rayrlhf.cluster.actors import ActorSet
from rayrlhf.config import TrainConfig
from rayrlhf.recipes import best_of_n
from rayrlhf.recipes.best_of_n import _mean, select_best
from rayrlhf.types import Sample
from rayrlhf.workers.judge import JudgeEngine
from rayrlhf.workers.reward import RewardWorker


def test_select_best_keeps_each_prompts_highest_scoring_sample():
    samples = [Sample([1], [10 + i], [0.0], f"r{i}") for i in range(6)]
    scores = torch.tensor([0.1, 0.9, 0.3, 0.5, 0.5, 0.2])  # 2 prompts x 3 samples; a tie in #2
    out = select_best(samples, ["p0", "p1"], scores, n=3)
    assert [(r.prompt, r.response, r.response_ids) for r in out] == [
        ("p0", "r1", (11,)),
        ("p1", "r3", (13,)),  # the first of equal scores
    ]
    assert out[0].score == torch.tensor(0.9).item()
    assert out[1].scores == tuple(torch.tensor([0.5, 0.5, 0.2]).tolist())


def test_select_best_with_one_sample_is_the_identity():
    samples = [Sample([1], [2], [0.0], "a"), Sample([1], [3], [0.0], "b")]
    out = select_best(samples, ["p", "q"], torch.tensor([0.4, -1.0]), n=1)
    assert [r.response for r in out] == ["a", "b"]


def test_select_best_never_picks_an_invalid_sample_and_skips_all_invalid_prompts():
    samples = [Sample([1], [10 + i], [0.0], f"r{i}") for i in range(6)]
    # Prompt p0: r1 scored highest but invalid (its 0 placeholder would also beat r0's -0.5);
    # prompt p1: every sample invalid; prompt p2: r5 is the only valid one.
    scores = torch.tensor([-0.5, 0.0, -2.0, 0.0, 0.0, 0.0])
    valid = torch.tensor([True, False, False, False, False, True])
    out = select_best(samples, ["p0", "p1", "p2"], scores, n=2, valid=valid)
    assert [(r.prompt, r.response) for r in out] == [("p0", "r0"), ("p2", "r5")]
    assert out[0].scores[0] == -0.5 and math.isnan(out[0].scores[1])  # invalid: NaN, not 0


def test_report_means_skip_invalid_scores_and_an_empty_mean_is_null():
    assert _mean([1.0, math.nan, 3.0]) == 2.0
    assert _mean([]) is None and _mean([math.nan]) is None
    assert json.dumps({"mean_best_score": _mean([])}) == '{"mean_best_score": null}'


class _Handle:
    """A fake actor handle: the class and the constructor arguments it was started with."""

    def __init__(self, cls, args):
        self.cls, self.args = cls, args


def _fake_ray(monkeypatch) -> list:
    """Ray as `ActorSet` uses it, faked: nothing starts; returns the list of killed handles."""
    killed = []
    remote = lambda cls: types.SimpleNamespace(  # noqa: E731
        options=lambda **_: types.SimpleNamespace(remote=lambda *a: _Handle(cls, a))
    )
    monkeypatch.setattr(actors_module.ray, "remote", remote)
    monkeypatch.setattr(actors_module.ray, "kill", killed.append)
    monkeypatch.setattr(actors_module, "reserve", lambda *a: object())
    monkeypatch.setattr(actors_module, "actor_options", lambda *a: {})
    monkeypatch.setattr(actors_module, "remove_placement_group", lambda pg: None)
    monkeypatch.setattr(actors_module, "sweep_abandoned", lambda *a, **k: None)
    monkeypatch.setattr(ActorSet, "wait_ready", lambda self: None)
    return killed


def _config(**reward) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "run_dir": "runs/test",
            "policy": {"model_path": "p", "num_ranks": 1, "micro_batch_size": 2},
            "reward": {"rule": "m:f", "resources": {"num_cpus": 2}, **reward},
            "rollout": {"num_engines": 2, "resources": {"num_cpus": 1}},
            "critic": {"model_path": "c", "num_ranks": 1, "micro_batch_size": 2},
            "algorithm": {"rollout_batch_size": 8, "num_mini_batches": 1},
        }
    )


def test_best_of_n_starts_the_judge_engines_for_the_reward_actor_and_releases_them(monkeypatch):
    killed = _fake_ray(monkeypatch)
    judge = {"model_path": "j", "num_engines": 3, "resources": {"num_cpus": 4}}
    cfg = _config(judge=judge)
    with ActorSet(60, 60) as actors:
        best_of_n._start(cfg, actors)
        judges = actors.actors["judge"]
        expected = [(JudgeEngine, (cfg.reward.judge, cfg.seed, i)) for i in range(3)]
        assert [(h.cls, h.args) for h in judges] == expected  # `start_judges`, as PPO does
        (reward,) = actors.actors["reward"]
        assert reward.cls is RewardWorker and reward.args[0] is cfg.reward
        assert reward.args[-1] == judges  # the reward actor calls these engines
        started = list(judges) + [reward] + actors.actors["rollout"]
    assert sorted(map(id, killed)) == sorted(map(id, started))  # the judges too, on exit
    assert best_of_n.cpus_needed(cfg) == 2 * 1 + 2 + 3 * 4  # a local Ray has their CPUs


def test_best_of_n_without_a_judge_starts_none(monkeypatch):
    _fake_ray(monkeypatch)
    cfg = _config()
    with ActorSet(60, 60) as actors:
        best_of_n._start(cfg, actors)
        assert "judge" not in actors.actors and actors.actors["reward"][0].args[-1] is None
    assert best_of_n.cpus_needed(cfg) == 4
