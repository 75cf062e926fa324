import math

import pytest
import torch

from rayrlhf.algorithms.preference import (
    DPOStats,
    bradley_terry_loss,
    dpo_loss,
    sequence_logps,
)


def _at_init(batch=4, seed=0):
    """Policy == reference: random sequence log-probs, the policy's with gradients."""
    g = torch.Generator().manual_seed(seed)
    chosen = -10 * torch.rand(batch, generator=g, dtype=torch.float64)
    rejected = -10 * torch.rand(batch, generator=g, dtype=torch.float64)
    pc, pr = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    return pc, pr, chosen, rejected


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_at_init_is_log2_and_pushes_chosen_up(beta):
    pc, pr, rc, rr = _at_init()
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    # d/dh -log sigmoid(beta h) = -beta sigmoid(-beta h) = -beta / 2 at h = 0; mean over 4 pairs.
    torch.testing.assert_close(pc.grad, torch.full((4,), -beta / 8, dtype=torch.float64))
    torch.testing.assert_close(pr.grad, torch.full((4,), beta / 8, dtype=torch.float64))
    assert isinstance(stats, DPOStats)
    assert torch.equal(stats.chosen_rewards, torch.zeros(4, dtype=torch.float64))
    assert stats.reward_accuracy.item() == 0.0  # ties are not counted as correct


def test_ipo_at_init_and_gradient_sign():
    pc, pr, rc, rr = _at_init()
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert loss.item() == pytest.approx(1 / (4 * 0.1**2))  # (0 - 1/0.2)^2 = 25
    loss.backward()
    # d/dh (h - 5)^2 = 2 * (0 - 5) = -10 at h = 0, / 4 pairs = -2.5
    torch.testing.assert_close(pc.grad, torch.full((4,), -2.5, dtype=torch.float64))
    torch.testing.assert_close(pr.grad, torch.full((4,), 2.5, dtype=torch.float64))


# Pair 0: policy log-ratio -1 - (-3) = 2, reference 0 -> h = 2.
# Pair 1: policy log-ratio -5 - (-4) = -1, reference 0 -> h = -1.
PC = torch.tensor([-1.0, -5.0], dtype=torch.float64)
PR = torch.tensor([-3.0, -4.0], dtype=torch.float64)
RC = torch.tensor([-2.0, -4.0], dtype=torch.float64)
RR = torch.tensor([-2.0, -4.0], dtype=torch.float64)


def test_sigmoid_hand_case_and_stats():
    loss, stats = dpo_loss(PC, PR, RC, RR, beta=0.5)
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132617; -log sigmoid(-0.5) = log(1 + e^0.5) = 0.9740770
    assert loss.item() == pytest.approx((0.3132617 + 0.9740770) / 2, abs=1e-6)
    # chosen rewards 0.5 * (PC - RC) = (0.5, -0.5); rejected 0.5 * (PR - RR) = (-0.5, 0)
    assert stats.chosen_rewards.tolist() == [0.5, -0.5]
    assert stats.rejected_rewards.tolist() == [-0.5, 0.0]
    assert stats.reward_accuracy.item() == 0.5
    assert stats.reward_margin.item() == pytest.approx((1.0 - 0.5) / 2)


def test_ipo_hand_case():
    # beta 0.5: target 1/(2 beta) = 1; (2 - 1)^2 = 1, (-1 - 1)^2 = 4 -> mean 2.5
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo")
    assert loss.item() == pytest.approx(2.5)


def test_cdpo_hand_case_and_zero_smoothing_is_dpo():
    # loss = 0.9 * softplus(-beta h) + 0.1 * softplus(beta h) = softplus(-beta h) + 0.1 beta h
    # pair 0: 0.3132617 + 0.1 = 0.4132617; pair 1: 0.9740770 - 0.05 = 0.9240770
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx((0.4132617 + 0.9240770) / 2, abs=1e-6)

    g = torch.Generator().manual_seed(1)
    args = [torch.randn(8, generator=g) for _ in range(4)]
    smoothed, _ = dpo_loss(*args, beta=0.2, label_smoothing=0.0)
    plain, _ = dpo_loss(*args, beta=0.2)
    assert torch.equal(smoothed, plain)


def test_dpo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sigmoid, ipo"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, beta=0.0)
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.5)


def test_bradley_terry_hand_case_with_margin():
    rc = torch.tensor([2.0, 0.0], dtype=torch.float64, requires_grad=True)
    rr = torch.tensor([0.0, 1.0], dtype=torch.float64)
    # -log sigmoid(2) = log(1 + e^-2) = 0.1269280; -log sigmoid(-1) = log(1 + e) = 1.3132617
    loss, acc = bradley_terry_loss(rc, rr)
    assert loss.item() == pytest.approx((0.1269280 + 1.3132617) / 2, abs=1e-6)
    assert acc.item() == 0.5
    # margin (1, 0): pair 0 becomes -log sigmoid(1) = 0.3132617; accuracy ignores the margin
    loss, acc = bradley_terry_loss(rc, rr, margin=torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert loss.item() == pytest.approx((0.3132617 + 1.3132617) / 2, abs=1e-6)
    assert acc.item() == 0.5
    loss.backward()
    # d/drc -log sigmoid(d) = -sigmoid(-d): d = 1 -> -0.2689414, d = -1 -> -0.7310586; / 2
    expected = torch.tensor([-0.2689414, -0.7310586], dtype=torch.float64) / 2
    torch.testing.assert_close(rc.grad, expected, atol=1e-6, rtol=0)


def test_sequence_logps_sums_valid_tokens():
    lp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, 9.0, -float("inf")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sequence_logps(lp, mask).tolist() == [-3.0, -0.5]
    assert sequence_logps(lp, torch.zeros(2, 3)).tolist() == [0.0, 0.0]
