import math

import pytest
import torch

from rayrlhf.algorithms.losses import (
    PolicyLossStats,
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    ppo_policy_loss,
    value_loss,
)


def test_vanilla_policy_gradient_when_ratio_is_one():
    g = torch.Generator().manual_seed(0)
    logprobs = (-torch.rand(3, 5, generator=g, dtype=torch.float64)).requires_grad_()
    old = logprobs.detach().clone()
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.float64)
    n_tokens = 10

    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    assert isinstance(stats, PolicyLossStats)
    assert loss.item() == pytest.approx(-(adv * mask).sum().item() / n_tokens)
    assert stats.approx_kl.item() == 0.0
    assert stats.clipfrac.item() == 0.0
    assert stats.approx_kl.dim() == 0 and not stats.approx_kl.requires_grad

    loss.backward()
    torch.testing.assert_close(logprobs.grad, -adv * mask / n_tokens)


def test_clipped_branch_for_positive_and_negative_advantages():
    ratios = [1.5, 0.5, 0.5, 1.5, 1.0]
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    logprobs = torch.tensor([[math.log(x) for x in ratios]], dtype=torch.float64)
    logprobs.requires_grad_()
    old = torch.zeros(1, 5, dtype=torch.float64)
    old[0, 4] = -1e4  # garbage on padding: exp(1e4) would be inf without masking

    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    # token 0: A=+1, r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped, no gradient)
    # token 1: A=-1, r=0.5 -> max( 0.5,  0.8) =  0.8 (clipped, no gradient)
    # token 2: A=+1, r=0.5 -> max(-0.5, -0.8) = -0.5 (unclipped, d/dlogp = -A*r = -0.5)
    # token 3: A=-1, r=1.5 -> max( 1.5,  1.2) =  1.5 (unclipped, d/dlogp = -A*r = +1.5)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.5 + 1.5) / 4)
    assert stats.clipfrac.item() == pytest.approx(0.5)
    # (r - 1) - ln r: r=1.5 -> 0.5 - 0.405465 = 0.094535; r=0.5 -> -0.5 + 0.693147 = 0.193147
    assert stats.approx_kl.item() == pytest.approx((0.094535 + 0.193147) / 2, abs=1e-6)

    loss.backward()
    expected = torch.tensor([[0.0, 0.0, -0.5 / 4, 1.5 / 4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logprobs.grad, expected)


VALUES = torch.tensor([[1.0, 2.0, 0.0, 2.0, 9.0]], dtype=torch.float64)
OLD_VALUES = torch.tensor([[1.5, 1.0, 0.0, 1.0, -4.0]], dtype=torch.float64)
RETURNS = torch.tensor([[0.0, 2.5, 1.0, 1.0, 7.0]], dtype=torch.float64)
V_MASK = torch.tensor([[1, 1, 1, 1, 0]])


def test_value_loss_unclipped():
    # squared errors 1.0, 0.25, 1.0, 1.0 -> 0.5 * 3.25 / 4
    loss, clipfrac = value_loss(VALUES, OLD_VALUES, RETURNS, V_MASK, clip_eps=None)
    assert loss.item() == pytest.approx(0.40625)
    assert clipfrac.item() == 0.0


def test_value_loss_clipped():
    # V_clip = old + clip(V - old, +-0.2) = 1.3, 1.2, 0.0, 1.2
    # clipped errors 1.69, 1.69, 1.0, 0.04 vs unclipped 1.0, 0.25, 1.0, 1.0
    # max -> 1.69, 1.69, 1.0 (tie: not counted as clipped), 1.0
    loss, clipfrac = value_loss(VALUES, OLD_VALUES, RETURNS, V_MASK, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5 * 5.38 / 4)
    assert clipfrac.item() == pytest.approx(0.5)


def test_value_loss_gradient_zero_where_clipped():
    values = VALUES.clone().requires_grad_()
    loss, _ = value_loss(values, OLD_VALUES, RETURNS, V_MASK, clip_eps=0.2)
    loss.backward()
    # unclipped tokens: d/dV 0.5 * (V - R)^2 / 4 = (V - R) / 4
    expected = torch.tensor([[0.0, 0.0, -1.0 / 4, 1.0 / 4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(values.grad, expected)


def test_entropy():
    uniform = entropy_from_logits(torch.zeros(2, 3, 7))
    assert uniform.shape == (2, 3)
    assert torch.allclose(uniform, torch.full((2, 3), math.log(7)))
    # constant shift does not matter, and large logits do not overflow
    shifted = entropy_from_logits(torch.full((1, 1, 5), 500.0))
    assert torch.allclose(shifted, torch.tensor(math.log(5)))
    # p = (1/2, 1/4, 1/4): H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2
    logits = torch.tensor([[[math.log(0.5), math.log(0.25), math.log(0.25)]]])
    assert entropy_from_logits(logits).item() == pytest.approx(1.5 * math.log(2), rel=1e-6)
    peaked = entropy_from_logits(torch.tensor([[[1000.0, 0.0, 0.0]]]))
    assert torch.isfinite(peaked).all() and peaked.item() == pytest.approx(0.0, abs=1e-6)


def test_logprobs_from_logits_matches_manual_softmax():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (2, 4), generator=g)
    out = logprobs_from_logits(logits, labels)
    for b in range(2):
        for t in range(4):
            row = [math.exp(z) for z in logits[b, t].tolist()]
            manual = math.log(row[labels[b, t]] / sum(row))
            assert out[b, t].item() == pytest.approx(manual, rel=1e-9)


def test_logprobs_from_logits_upcasts_half_precision():
    logits = torch.randn(1, 3, 50).to(torch.bfloat16)
    labels = torch.tensor([[0, 7, 49]])
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, logprobs_from_logits(logits.float(), labels))


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 4.0, 8.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    mean = torch.full_like(returns, (1.0 + 2.0 + 4.0 + 8.0) / 4)
    assert explained_variance(mean, returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    # constant returns: variance 0, defined as 0.0 and never NaN
    const = torch.full((2, 4), 3.7)
    ev = explained_variance(torch.randn(2, 4), const, torch.ones(2, 4))
    assert ev.dim() == 0 and ev.item() == 0.0
    assert explained_variance(returns, returns, torch.zeros(1, 5)).item() == 0.0
