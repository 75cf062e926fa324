import math

import pytest
import torch

from rayrlhf.algorithms.advantages import gae, terminal_rewards_with_kl
from rayrlhf.algorithms.estimators import (
    NO_PICK,
    best_of_n,
    dr_grpo_advantages,
    get_estimator,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rayrlhf.config import AlgorithmConfig

GROUP_ESTIMATORS = [grpo_advantages, dr_grpo_advantages, rloo_advantages]

# Two prompts, n = 3 samples each: rewards (1, 2, 6) and (5, 5, 5). Row 4 has no action token.
REWARDS = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0], dtype=torch.float64)
MASK = torch.tensor(
    [
        [1, 1, 0, 0],
        [0, 1, 1, 1],
        [1, 0, 0, 0],
        [1, 1, 1, 1],
        [0, 0, 0, 0],
        [1, 1, 0, 0],
    ]
)


def _spread(seq_adv):
    """Hand-written per-row advantages placed on MASK's action tokens."""
    return torch.tensor(seq_adv, dtype=torch.float64).unsqueeze(1) * MASK


def test_grpo_hand_case():
    # Group 1: mean 3, deviations (-2, -1, 3); unbiased var = (4 + 1 + 9) / 2 = 7, std = sqrt 7.
    # Group 2: all equal -> 0.
    s = math.sqrt(7) + 1e-6
    expected = _spread([-2 / s, -1 / s, 3 / s, 0.0, 0.0, 0.0])
    out = grpo_advantages(REWARDS, MASK, n=3)
    torch.testing.assert_close(out, expected)
    # -2/sqrt(7) = -0.755929: the population std (sqrt(14/3)) would give -0.925820 instead.
    assert out[0, 0].item() == pytest.approx(-0.755929, abs=1e-6)
    assert torch.all(out[~MASK.bool()] == 0)


def test_grpo_two_samples_and_integer_rewards():
    # rewards {0, 1}: mean 0.5, unbiased std = sqrt(0.5) -> +-0.5 / 0.707107 = +-0.707107
    out = grpo_advantages(torch.tensor([0, 1]), torch.ones(2, 2), n=2)
    assert out.is_floating_point()
    torch.testing.assert_close(out, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]) / math.sqrt(2))


def test_dr_grpo_hand_case():
    out = dr_grpo_advantages(REWARDS, MASK, n=3)
    torch.testing.assert_close(out, _spread([-2.0, -1.0, 3.0, 0.0, 0.0, 0.0]))


def test_rloo_hand_case():
    # Leave-one-out baselines: 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5.
    out = rloo_advantages(REWARDS, MASK, n=3)
    torch.testing.assert_close(out, _spread([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_group_of_one_gives_zero_not_nan(estimator):
    rewards = torch.tensor([0.3, -2.0, 7.5])
    out = estimator(rewards, torch.ones(3, 4), n=1)
    assert torch.equal(out, torch.zeros(3, 4))


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_all_equal_rewards_give_exactly_zero(estimator):
    # 0.1 is not exact in binary: the float mean of (0.1, 0.1, 0.1) is off by an ulp, which a
    # division by a ~0 std would blow up unless equal groups are zeroed explicitly.
    for dtype in (torch.float32, torch.float64):
        rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=dtype)
        out = estimator(rewards, torch.ones(6, 3), n=3)
        assert torch.equal(out, torch.zeros(6, 3, dtype=dtype))


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_group_estimators_are_constants_and_check_layout(estimator):
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0], requires_grad=True)
    out = estimator(rewards, torch.ones(4, 2), n=2)
    assert not out.requires_grad
    with pytest.raises(ValueError, match="multiple"):
        estimator(rewards, torch.ones(4, 2), n=3)


def test_reinforce_pp_hand_case():
    kl = torch.tensor([[9.0, 1.0, 2.0, 3.0], [2.0, 4.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    rewards = torch.tensor([1.0, -1.0], dtype=torch.float64)
    # kl_coef 0.1: token rewards row 0 = (0, -0.1, -0.2, -0.3 + 1) = (0, -0.1, -0.2, 0.7)
    #                            row 1 = (-0.2, -0.4 - 1, 0, 0)
    # reward-to-go:  row 0 = (-, 0.4, 0.5, 0.7), row 1 = (-1.6, -1.4, -, -)
    # global mean = (0.4 + 0.5 + 0.7 - 1.6 - 1.4) / 5 = -0.28
    # deviations 0.68, 0.78, 0.98, -1.32, -1.12; squares sum to 5.028 -> var = 1.0056
    std = math.sqrt(1.0056)
    expected = torch.tensor(
        [[0.0, 0.68 / std, 0.78 / std, 0.98 / std], [-1.32 / std, -1.12 / std, 0.0, 0.0]],
        dtype=torch.float64,
    )
    out = reinforce_pp_advantages(rewards, mask, kl=kl, kl_coef=0.1)
    torch.testing.assert_close(out, expected)
    assert torch.all(out[~mask.bool()] == 0)


def test_reinforce_pp_without_kl_and_degenerate_batches():
    # No KL: returns are R on every action token; rewards (2, 0), 2 tokens each -> +-1.
    out = reinforce_pp_advantages(torch.tensor([2.0, 0.0]), torch.ones(2, 2))
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    # All-equal rewards (no groups here: the whole batch) and a single row give exactly 0. The
    # float32 mean of twelve 0.1s is off by ~1e-8, which whitening alone would turn into 1e-4.
    for rewards in (torch.full((4,), 0.1), torch.tensor([3.7])):
        out = reinforce_pp_advantages(rewards, torch.ones(rewards.shape[0], 3))
        assert torch.equal(out, torch.zeros(rewards.shape[0], 3))
    assert torch.equal(
        reinforce_pp_advantages(torch.tensor([1.0]), torch.zeros(1, 3)), torch.zeros(1, 3)
    )


def test_reinforce_pp_discounts_by_gamma():
    # One row of 3 action tokens, terminal reward 1, no KL: G = (g^2, g, 1). Two rows so that
    # whitening leaves a signal: the second row's reward is 0, G = (0, 0, 0).
    mask = torch.ones(2, 3)
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g = 0.5
    returns = torch.tensor([[g * g, g, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    mean, var = returns.mean(), returns.var(unbiased=False)
    expected = (returns - mean) / torch.sqrt(var + 1e-8)
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, gamma=g), expected)
    # The registered step reads algorithm.gamma (it once ignored it: gamma 1 for every run).
    algo = AlgorithmConfig(advantage="reinforce_pp", gamma=g, rollout_batch_size=2)
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    advantages, _ = get_estimator("reinforce_pp")(rewards, zeros, 0.0, zeros, mask, algo)
    torch.testing.assert_close(advantages, expected)


def test_registered_steps_run_their_estimator():
    algo = AlgorithmConfig(n_samples_per_prompt=3, rollout_batch_size=6, whiten_advantages=False)
    zeros = torch.zeros(MASK.shape, dtype=torch.float64)  # no KL, values 0
    for name, fn in zip(("grpo", "dr_grpo", "rloo"), GROUP_ESTIMATORS):
        advantages, returns = get_estimator(name)(REWARDS, zeros, 0.0, zeros, MASK, algo)
        torch.testing.assert_close(advantages, fn(REWARDS, MASK, 3))
        assert not returns.any()
    advantages, _ = get_estimator("reinforce_pp")(REWARDS, zeros, 0.0, zeros, MASK, algo)
    torch.testing.assert_close(advantages, reinforce_pp_advantages(REWARDS, MASK))
    advantages, returns = get_estimator("gae")(REWARDS, zeros, 0.0, zeros, MASK, algo)
    token_rewards = terminal_rewards_with_kl(REWARDS, zeros, MASK, 0.0)
    expected = gae(token_rewards, zeros, MASK, algo.gamma, algo.lam)
    torch.testing.assert_close((advantages, returns), expected)


def test_best_of_n_hand_case_first_on_ties():
    scores = torch.tensor([0.1, 0.9, 0.9, 3.0, -1.0, 2.0, -5.0, -5.0, -5.0])
    # group 0: tie between rows 1 and 2 -> 1; group 1: row 3; group 2: all tied -> row 6
    out = best_of_n(scores, n=3)
    assert out.dtype == torch.long
    assert out.tolist() == [1, 3, 6]


def test_best_of_n_matches_python_argmax():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (40,), generator=g).float()  # many ties
    n = 5
    expected = [k * n + max(range(n), key=lambda j: scores[k * n + j].item()) for k in range(8)]
    assert best_of_n(scores, n).tolist() == expected
    assert best_of_n(scores, 1).tolist() == list(range(40))
    with pytest.raises(ValueError):
        best_of_n(scores, 3)


# Invalid samples (a reward function gave None/NaN; the score is a placeholder). Group 1 holds
# rewards (1, 2, x) with x invalid; group 2 (5, x, x); group 3 (x, x, x); group 4 (0, 3, 9).
INV_REWARDS = torch.tensor([1.0, 2.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 9.0])
INV_VALID = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
INV_MASK = torch.ones(12, 2)


def _rows(seq_adv):
    return torch.tensor(seq_adv).unsqueeze(1).expand(-1, 2)


def test_grpo_baseline_and_std_are_over_the_valid_samples_only():
    out = grpo_advantages(INV_REWARDS, INV_MASK, n=3, valid=INV_VALID)
    # Group 1: valid (1, 2), mean 1.5, unbiased std sqrt(0.5). Group 4: mean 4, deviations
    # (-4, -1, 5), unbiased std sqrt(42 / 2). Groups 2 and 3: under two valid samples -> 0.
    a, s = 0.5 / (math.sqrt(0.5) + 1e-6), math.sqrt(21.0) + 1e-6
    expected = [-a, a, 0, 0, 0, 0, 0, 0, 0, -4 / s, -1 / s, 5 / s]
    torch.testing.assert_close(out, _rows(expected))


def test_dr_grpo_and_rloo_baselines_are_over_the_valid_samples_only():
    dr = dr_grpo_advantages(INV_REWARDS, INV_MASK, n=3, valid=INV_VALID)
    torch.testing.assert_close(dr, _rows([-0.5, 0.5, 0, 0, 0, 0, 0, 0, 0, -4.0, -1.0, 5.0]))
    # Leave-one-out over valid samples: 1 - 2, 2 - 1; group 4: 0 - 6, 3 - 4.5, 9 - 1.5.
    rloo = rloo_advantages(INV_REWARDS, INV_MASK, n=3, valid=INV_VALID)
    torch.testing.assert_close(rloo, _rows([-1.0, 1.0, 0, 0, 0, 0, 0, 0, 0, -6.0, -1.5, 7.5]))


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
def test_an_invalid_samples_placeholder_score_changes_nothing(estimator):
    base = estimator(INV_REWARDS, INV_MASK, n=3, valid=INV_VALID)
    garbage = torch.where(INV_VALID, INV_REWARDS, torch.tensor(float("nan")))
    torch.testing.assert_close(estimator(garbage, INV_MASK, n=3, valid=INV_VALID), base)
    assert torch.equal(estimator(INV_REWARDS, INV_MASK, n=3, valid=None), estimator(
        INV_REWARDS, INV_MASK, n=3, valid=torch.ones(12, dtype=torch.bool)
    ))  # fmt: skip
    with pytest.raises(ValueError, match="valid"):
        estimator(INV_REWARDS, INV_MASK, n=3, valid=INV_VALID[:6])


@pytest.mark.parametrize("name", ["gae", "reinforce_pp", "grpo", "dr_grpo", "rloo"])
def test_every_estimator_gives_invalid_samples_zero_and_leaves_them_out(name):
    # Rows 0, 1 valid (the first group), rows 2, 3 invalid (the second): the valid rows'
    # advantages equal those of the batch without the invalid rows (whitening included).
    algo = AlgorithmConfig(advantage=name, n_samples_per_prompt=2, rollout_batch_size=4)
    rewards = torch.tensor([1.0, 0.0, 3.0, 7.0])
    valid = torch.tensor([True, True, False, False])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kl = torch.full((4, 3), 0.1)
    values = torch.full((4, 3), 0.5)
    adv, ret = get_estimator(name)(rewards, kl, 0.05, values, mask, algo, valid)
    assert not adv[2:].any() and not ret[2:].any()
    kept = AlgorithmConfig(advantage=name, n_samples_per_prompt=2, rollout_batch_size=2)
    alone = get_estimator(name)(rewards[:2], kl[:2], 0.05, values[:2], mask[:2], kept)
    torch.testing.assert_close((adv[:2], ret[:2]), alone)


def test_best_of_n_never_picks_an_invalid_sample():
    scores = torch.tensor([0.0, -1.0, 2.0, 5.0, float("nan"), 0.0, 0.0, 4.0, 1.0])
    valid = torch.tensor([True, True, False, False, False, False, True, False, True])
    # Group 0: row 2 (2.0) is invalid -> row 0; group 1: none valid; group 2: rows 6, 8 -> 8.
    assert best_of_n(scores, 3, valid).tolist() == [0, NO_PICK, 8]
    # Below every valid score, even a negative one: a placeholder 0 must not win.
    neg = torch.tensor([-3.0, 0.0])
    assert best_of_n(neg, 2, torch.tensor([True, False])).tolist() == [0]
