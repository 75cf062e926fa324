import math

import pytest
import torch

from rayrlhf.algorithms.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_loss_term,
)
from rayrlhf.algorithms.losses import Aggregation
from rayrlhf.types import LossNorm


def test_registry_names():
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_hand_values_for_p_half_q_quarter():
    # log p = log 0.5 (policy), log q = log 0.25 (reference) -> log ratio = log 2.
    lp = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    lq = torch.tensor([[math.log(0.25)]], dtype=torch.float64)
    # k1 = ln 2 = 0.693147...
    assert kl_estimate(lp, lq, "k1").item() == pytest.approx(0.6931471806)
    # k2 = 0.5 * (ln 2)^2 = 0.5 * 0.480453 = 0.240227
    assert kl_estimate(lp, lq, "k2").item() == pytest.approx(0.2402265070)
    # k3 = q/p - 1 - ln(q/p) = 0.5 - 1 + ln 2 = 0.193147
    assert kl_estimate(lp, lq, "k3").item() == pytest.approx(0.1931471806)
    assert kl_estimate(lp, lq).item() == pytest.approx(0.6931471806)  # default is k1
    # Identical distributions: every estimator is exactly 0.
    for kind in ("k1", "k2", "k3"):
        assert kl_estimate(lp, lp, kind).item() == 0.0


def test_k3_nonnegative_and_finite_on_random_and_extreme_inputs():
    g = torch.Generator().manual_seed(1)
    lp = torch.randn(64, 32, generator=g) * 5
    lq = torch.randn(64, 32, generator=g) * 5
    lp[0, 0], lq[0, 0] = -200.0, 0.0  # huge negative log ratio would overflow exp
    lp[0, 1], lq[0, 1] = 0.0, -200.0
    k3 = kl_estimate(lp, lq, "k3")
    assert torch.isfinite(k3).all()
    assert (k3 >= 0).all()
    assert (kl_estimate(lp, lq, "k2") >= 0).all()


def test_k3_stays_nonnegative_near_zero_in_float32():
    # exp(-d) - 1 + d cancels near d = 0: in float32 it gave -3e-8 for |d| ~ 1e-4.
    d = torch.logspace(-8, -2, 2000, dtype=torch.float32)
    lp = torch.zeros(2, 2000)
    k3 = kl_estimate(lp, torch.stack([-d, d]), "k3")  # log ratios +d and -d
    assert (k3 >= 0).all(), k3.min()
    # and it is still k3: 0.5 d^2 to leading order
    torch.testing.assert_close(k3[0, -1], torch.tensor(0.5e-4 - 1e-6 / 6), rtol=1e-3, atol=0)


def test_k1_and_k3_are_unbiased_under_policy_sampling():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)  # policy (sampling) distribution
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)  # reference
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    g = torch.Generator().manual_seed(2)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[samples].view(1, -1), q.log()[samples].view(1, -1)
    assert kl_estimate(lp, lq, "k1").mean().item() == pytest.approx(true_kl, abs=0.01)
    assert kl_estimate(lp, lq, "k3").mean().item() == pytest.approx(true_kl, abs=0.01)


def test_unknown_estimator_lists_valid_names():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(x, x, "k4")


def test_fixed_controller_never_changes():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=10_000)
    assert ctl.value == 0.05


def _updated(kl: float, n_steps: int = 1000) -> float:
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    ctl.update(kl, n_steps)
    return ctl.value


def test_adaptive_controller_hand_numbers():
    # kl = 6.6: error = 6.6/6 - 1 = 0.1 (unclipped); 0.1 * (1 + 0.1 * 1000/10000) = 0.101
    assert _updated(6.6) == pytest.approx(0.101)
    # kl = 5.4: error = -0.1; 0.1 * (1 - 0.01) = 0.099
    assert _updated(5.4) == pytest.approx(0.099)
    # kl = 9 -> error 0.5 clipped to 0.2: 0.1 * 1.02 = 0.102; kl = 600 clips the same way
    assert _updated(9.0) == pytest.approx(0.102)
    assert _updated(600.0) == pytest.approx(0.102)
    # kl = 3 -> error -0.5 clipped to -0.2: 0.1 * 0.98 = 0.098; kl = 0 the same
    assert _updated(3.0) == pytest.approx(0.098)
    assert _updated(0.0) == pytest.approx(0.098)
    # on target: unchanged
    assert _updated(6.0) == pytest.approx(0.1)


def test_adaptive_controller_compounds_over_updates():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    ctl.update(12.0, 5000)  # error clipped to 0.2, factor 1 + 0.2 * 0.5 = 1.1
    ctl.update(12.0, 5000)
    assert ctl.value == pytest.approx(0.121)


def test_adaptive_controller_never_locks_at_zero_on_a_large_batch():
    # n_steps = 5 horizons at low KL: Ziegler's factor 1 - 0.2 * 5 = 0 set beta to 0 for good.
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=100)
    ctl.update(0.0, 500)
    assert ctl.value == pytest.approx(0.1 * 0.8**5)  # five sub-updates of one horizon each
    ctl.update(60.0, 100)  # KL far above target: beta must be able to rise again
    assert ctl.value == pytest.approx(0.1 * 0.8**5 * 1.2)
    # A batch of 1.5 horizons is two sub-updates of 0.75 horizons.
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=100)
    ctl.update(0.0, 150)
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 0.75) ** 2)


def test_adaptive_controller_floor_ceiling_and_damping_hand_numbers():
    # Floor: kl = 0 -> error clipped to -0.2, horizon = n_steps: 0.1 * 0.8 = 0.08 -> floor 0.09
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=32, min_coef=0.09)
    ctl.update(0.0, 32)
    assert ctl.value == pytest.approx(0.09) and ctl.integral == pytest.approx(0.09)
    # Ceiling: kl = 4 -> +0.2: 0.1 * 1.2 = 0.12 -> ceiling 0.11
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=32, max_coef=0.11)
    ctl.update(4.0, 32)
    assert ctl.value == pytest.approx(0.11)
    # Damping: kl = 3, target 2 -> error 0.5. Integral: 0.1 * (1 + 0.2 * 32/64) = 0.11;
    # beta = 0.11 * exp(1.5 * 0.5) = 0.11 * 2.117000 = 0.232870
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=64, gain=1.5)
    ctl.update(3.0, 32)
    assert ctl.integral == pytest.approx(0.11)
    assert ctl.value == pytest.approx(0.11 * math.exp(0.75))
    # The damping term's error is clipped at +-1: kl = 100 counts as 2x target
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=64, gain=1.5)
    ctl.update(100.0, 32)
    assert ctl.value == pytest.approx(0.11 * math.exp(1.5))
    with pytest.raises(ValueError, match="min_coef"):
        AdaptiveKLController(0.01, target=2.0, horizon=64, min_coef=0.02)


def _lagged_policy(ctl: AdaptiveKLController, steps: int = 60, seed: int = 0) -> list[float]:
    """A model of what the controller steers, fitted to the demo task (PPO, lr 5e-4, batch 32):
    KL drifts up by 35 * (0.03 - beta) nats per step once the policy moves (0.15 before
    step 15), beta acts two steps after the KL it reacts to, and each batch's KL is noisy."""
    gen, kl, measured = torch.Generator().manual_seed(seed), 0.0, []
    for t in range(steps):
        noise = 0.4 * min(1.0, kl / 3) * torch.randn((), generator=gen).item()
        measured.append(max(0.0, kl + noise))
        kl = max(0.0, kl + (35 * (0.03 - ctl.value) if t >= 15 else 0.15))
        ctl.update(measured[-1], n_steps=32)
    return measured


def test_damping_and_floor_hold_kl_where_ziegler_alone_oscillates():
    target, in_band = 3.0, lambda kl: all(target / 2 <= k <= 2 * target for k in kl[30:])
    for seed in range(5):
        ziegler = AdaptiveKLController(0.01, target, horizon=128)
        damped = AdaptiveKLController(0.01, target, horizon=128, gain=1.5, min_coef=0.01)
        assert not in_band(_lagged_policy(ziegler, seed=seed)), seed
        assert in_band(_lagged_policy(damped, seed=seed)), seed


def test_kl_loss_term_hand_case_and_gradient():
    # token 0: log p = log 0.5, log p_ref = log 0.25 -> d = ln 2, k3 = 0.193147, k1 = 0.693147
    # token 1: identical -> 0; token 2: padding with garbage (would be inf/NaN if used)
    lp = torch.tensor([[math.log(0.5), math.log(0.3), float("nan")]], dtype=torch.float64)
    lq = torch.tensor([[math.log(0.25), math.log(0.3), float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    lp.requires_grad_()
    loss = kl_loss_term(lp, lq, mask)  # default k3, token mean over the 2 valid tokens
    assert loss.item() == pytest.approx(0.1931471806 / 2)
    loss.backward()
    # d k3 / d log p = 1 - exp(-d) = 1 - 0.5 = 0.5 on token 0, 0 on token 1; / 2 tokens
    torch.testing.assert_close(lp.grad, torch.tensor([[0.25, 0.0, 0.0]], dtype=torch.float64))
    assert kl_loss_term(lp, lq, mask, "k1").item() == pytest.approx(0.6931471806 / 2)
    # k2 = 0.5 d^2 = 0.240227 on token 0; d k2 / d log p = d = ln 2, / 2 tokens = 0.346574.
    # Its gradient multiplies by d, so NaN padding would give 0 * NaN = NaN if it were not zeroed.
    lp.grad = None
    k2 = kl_loss_term(lp, lq, mask, "k2")
    assert k2.item() == pytest.approx(0.2402265070 / 2)
    k2.backward()
    expected = torch.tensor([[math.log(2) / 2, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(lp.grad, expected)


def test_kl_loss_term_aggregation_and_edge_cases():
    lp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64))
    lq = torch.log(torch.tensor([[0.25, 0.25], [0.25, 0.5]], dtype=torch.float64))
    mask = torch.tensor([[1, 1], [1, 0]])
    # k1 per token: ln 2 on (0,0), (0,1), (1,0). Token mean 3 ln2 / 3; 6 global tokens: ln2 / 2
    assert kl_loss_term(lp, lq, mask, "k1").item() == pytest.approx(math.log(2))
    six_tokens = Aggregation("token_mean", LossNorm(tokens=6, sequences=2, max_len=2))
    half = kl_loss_term(lp, lq, mask, "k1", agg=six_tokens)
    assert half.item() == pytest.approx(math.log(2) / 2)
    # sequence sums (2 ln 2, ln 2) averaged: 1.5 ln 2
    seq = kl_loss_term(lp, lq, mask, "k1", agg=Aggregation("seq_mean_token_sum"))
    assert seq.item() == pytest.approx(1.5 * math.log(2))
    assert kl_loss_term(lp, lq, torch.zeros(2, 2)).item() == 0.0
    with pytest.raises(ValueError, match="k1"):
        kl_loss_term(lp, lq, mask, "k5")
