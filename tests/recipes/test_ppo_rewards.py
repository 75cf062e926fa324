"""The driver's handling of the reward's output: invalid samples leave the action mask, an
all-invalid batch skips the update, and reward/* reaches the step's record."""

from __future__ import annotations

import math

import torch

from rayrlhf.recipes.ppo import invalid_filter, reward_record, train_unless_empty
from rayrlhf.types import Experience, RewardOutput, Scores, StepUpdate, TrainStats


def _exp(b: int = 3, r: int = 4) -> Experience:
    z = torch.zeros(b, r)
    return Experience(
        torch.zeros(b, r + 2, dtype=torch.long), torch.ones(b, r + 2, dtype=torch.long),
        torch.ones(b, r), z, z, z, z, z,
    )  # fmt: skip


def _scores(valid: list[bool], extras=None) -> Scores:
    v = torch.tensor(valid)
    rewards = torch.where(v, torch.ones(len(valid)), torch.zeros(len(valid)))
    out = RewardOutput(rewards, v, extras or {})
    z = torch.zeros(len(valid), 4)
    return Scores(rewards, z, z, z, reward=out)


def test_invalid_samples_leave_the_action_mask():
    exp = invalid_filter(_exp(), _scores([True, False, True]))
    assert exp.action_mask.sum(1).tolist() == [4.0, 0.0, 4.0]
    same = _exp()
    assert invalid_filter(same, _scores([True] * 3)) is same
    hand_built = Scores(torch.zeros(3), *(torch.zeros(3, 4),) * 3)  # reward None: all valid
    assert invalid_filter(same, hand_built) is same


class _Roles:
    def __init__(self) -> None:
        self.trained = 0

    def train(self, exp, beta, norms, timer):
        self.trained += 1
        return StepUpdate(TrainStats(loss=1.0), TrainStats(loss=2.0))


def test_an_all_invalid_batch_skips_the_update_with_a_warning(capsys):
    roles = _Roles()
    exp = invalid_filter(_exp(), _scores([False, False, False]))
    update = train_unless_empty(roles, exp, 0.1, [], None, step=7)
    assert roles.trained == 0 and update.policy.loss == update.critic.loss == 0.0
    assert update.logprobs is None  # no forward ran: the driver asks the policy for them
    assert "warning: step 7: no sample left to train on" in capsys.readouterr().out
    update = train_unless_empty(roles, _exp(), 0.1, [], None, step=8)
    assert roles.trained == 1 and update.policy.loss == 1.0


def test_reward_record_counts_invalid_and_averages_extras_over_valid():
    acc = torch.tensor([1.0, 0.0, 1.0, math.nan])
    rec = reward_record(_scores([True, True, False, True], {"accuracy": acc}))
    assert rec == {"reward/invalid": 1.0, "reward/accuracy": 0.5}
    assert reward_record(Scores(torch.zeros(1), *(torch.zeros(1, 1),) * 3)) == {}
