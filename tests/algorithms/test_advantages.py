import pytest
import torch

from rayrlhf.algorithms.advantages import gae, terminal_rewards_with_kl, whiten_advantages


def _rand(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_gamma_lambda_one_is_reward_to_go_minus_values():
    r, v = _rand((3, 5), 0), _rand((3, 5), 1)
    mask = torch.ones(3, 5)
    # Reward-to-go via "total minus prefix sum", not a backward recursion.
    reward_to_go = r.sum(dim=1, keepdim=True) - r.cumsum(dim=1) + r
    adv, ret = gae(r, v, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, reward_to_go - v)
    torch.testing.assert_close(ret, reward_to_go)


def test_lambda_zero_is_one_step_td_error():
    r, v = _rand((2, 6), 2), _rand((2, 6), 3)
    mask = torch.ones(2, 6)
    v_next = torch.cat([v[:, 1:], torch.zeros(2, 1, dtype=v.dtype)], dim=1)  # V_T = 0
    adv, ret = gae(r, v, mask, gamma=0.9, lam=0.0)
    torch.testing.assert_close(adv, r + 0.9 * v_next - v)
    torch.testing.assert_close(ret, r + 0.9 * v_next)


def test_hand_computed_three_tokens():
    r = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.4, 0.6]], dtype=torch.float64)
    # gamma = 0.9, lam = 0.95, gamma * lam = 0.855
    # delta_2 = 1 - 0.6 = 0.4            A_2 = 0.4
    # delta_1 = 0.9*0.6 - 0.4 = 0.14      A_1 = 0.14 + 0.855*0.4 = 0.482
    # delta_0 = 0.9*0.4 - 0.5 = -0.14     A_0 = -0.14 + 0.855*0.482 = 0.27211
    adv, ret = gae(r, v, torch.ones(1, 3), gamma=0.9, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.27211, 0.482, 0.4]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.77211, 0.882, 1.0]], dtype=torch.float64))


def test_padding_shifts_but_does_not_change_advantages():
    r, v = _rand((1, 4), 4), _rand((1, 4), 5)
    ref_adv, ref_ret = gae(r, v, torch.ones(1, 4), gamma=0.95, lam=0.9)

    # Row 0: 2 left prompt positions + 4 actions + 1 right pad; row 1: right pad only;
    # row 2: left only. Padding holds garbage that must be ignored.
    T = 7
    rp = torch.full((3, T), 123.0, dtype=torch.float64)
    vp = torch.full((3, T), -77.0, dtype=torch.float64)
    mask = torch.zeros(3, T)
    for row, start in enumerate((2, 0, 3)):
        rp[row, start : start + 4], vp[row, start : start + 4] = r[0], v[0]
        mask[row, start : start + 4] = 1
    adv, ret = gae(rp, vp, mask, gamma=0.95, lam=0.9)
    for row, start in enumerate((2, 0, 3)):
        torch.testing.assert_close(adv[row, start : start + 4], ref_adv[0])
        torch.testing.assert_close(ret[row, start : start + 4], ref_ret[0])
    assert torch.all(adv[~mask.bool()] == 0)
    assert torch.all(ret[~mask.bool()] == 0)


def test_gae_all_zero_mask_row_and_no_grad():
    r = _rand((2, 3), 6)
    v = _rand((2, 3), 7).requires_grad_()
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]])
    adv, ret = gae(r, v, mask, gamma=1.0, lam=1.0)
    assert torch.equal(adv[0], torch.zeros(3, dtype=torch.float64))
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert not adv.requires_grad and not ret.requires_grad


def test_terminal_reward_lands_on_last_action_token():
    kl = torch.tensor(
        [[9.0, 1.0, 2.0, 3.0, 9.0], [1.0, 2.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0, 9.0]]
    )
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    rewards = torch.tensor([2.0, -1.0, 5.0])
    out = terminal_rewards_with_kl(rewards, kl, mask, kl_coef=0.1)
    expected = torch.tensor(
        [
            [0.0, -0.1, -0.2, -0.3 + 2.0, 0.0],
            [-0.1, -0.2 - 1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0],  # no action tokens: no reward, no error
        ]
    )
    torch.testing.assert_close(out, expected)


def test_terminal_reward_full_row_and_bool_mask():
    out = terminal_rewards_with_kl(
        torch.tensor([1.5]), torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), kl_coef=0.5
    )
    assert out.tolist() == [[0.0, 0.0, 1.5]]


def test_whiten_advantages():
    adv = _rand((4, 6), 8) * 4 + 2
    mask = torch.ones(4, 6)
    mask[:, :2] = 0
    out = whiten_advantages(adv, mask)
    vals = out[mask.bool()]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert vals.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(out[:, :2] == 0)
