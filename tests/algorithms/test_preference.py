import math
from typing import get_args

import pytest
import torch

from rayrlhf.algorithms.preference import (
    PREFERENCE_LOSSES,
    LossParams,
    PreferenceScores,
    PreferenceStats,
    bradley_terry_loss,
    dpo_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    preference_loss_entry,
    sequence_logps,
    simpo_loss,
)
from rayrlhf.config import PreferenceLossName

F64 = torch.float64


def _params(**kw: float) -> LossParams:
    """Loss hyper-parameters: beta 0.1, no smoothing, gamma 0.5, KTO weights 1, except `kw`."""
    base = dict(beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, desirable_weight=1.0)
    return LossParams(**{**base, "undesirable_weight": 1.0, **kw})


def _t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def _at_init(batch=4, seed=0):
    """Policy == reference: random sequence log-probs, the policy's with gradients."""
    g = torch.Generator().manual_seed(seed)
    chosen = -10 * torch.rand(batch, generator=g, dtype=F64)
    rejected = -10 * torch.rand(batch, generator=g, dtype=F64)
    pc, pr = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    return pc, pr, chosen, rejected


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_at_init_is_log2_and_pushes_chosen_up(beta):
    pc, pr, rc, rr = _at_init()
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    # d/dh -log sigmoid(beta h) = -beta sigmoid(-beta h) = -beta / 2 at h = 0; mean over 4 pairs.
    torch.testing.assert_close(pc.grad, torch.full((4,), -beta / 8, dtype=F64))
    torch.testing.assert_close(pr.grad, torch.full((4,), beta / 8, dtype=F64))
    assert isinstance(stats, PreferenceStats)
    assert stats.chosen_reward.item() == 0.0
    assert stats.reward_accuracy.item() == 0.0  # ties are not counted as correct


def test_ipo_at_init_and_gradient_sign():
    pc, pr, rc, rr = _at_init()
    loss, _ = ipo_loss(pc, pr, rc, rr, tau=0.1)
    assert loss.item() == pytest.approx(1 / (4 * 0.1**2))  # (0 - 1/0.2)^2 = 25
    loss.backward()
    # d/dh (h - 5)^2 = 2 * (0 - 5) = -10 at h = 0, / 4 pairs = -2.5
    torch.testing.assert_close(pc.grad, torch.full((4,), -2.5, dtype=F64))
    torch.testing.assert_close(pr.grad, torch.full((4,), 2.5, dtype=F64))


# Pair 0: policy log-ratio -1 - (-3) = 2, reference 0 -> h = 2.
# Pair 1: policy log-ratio -5 - (-4) = -1, reference 0 -> h = -1.
PC, PR = _t(-1.0, -5.0), _t(-3.0, -4.0)
RC, RR = _t(-2.0, -4.0), _t(-2.0, -4.0)


def test_sigmoid_hand_case_and_stats():
    loss, stats = dpo_loss(PC, PR, RC, RR, beta=0.5)
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132617; -log sigmoid(-0.5) = log(1 + e^0.5) = 0.9740770
    assert loss.item() == pytest.approx((0.3132617 + 0.9740770) / 2, abs=1e-6)
    # chosen rewards 0.5 * (PC - RC) = (0.5, -0.5); rejected 0.5 * (PR - RR) = (-0.5, 0)
    assert stats.chosen_reward.item() == 0.0
    assert stats.rejected_reward.item() == -0.25
    assert stats.reward_accuracy.item() == 0.5
    assert stats.margin.item() == pytest.approx((1.0 - 0.5) / 2)
    assert stats.nll is None and stats.kl is None


def test_ipo_hand_case():
    # tau 0.5: target 1/(2 tau) = 1; (2 - 1)^2 = 1, (-1 - 1)^2 = 4 -> mean 2.5
    loss, _ = ipo_loss(PC, PR, RC, RR, tau=0.5)
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


def test_simpo_hand_case():
    # beta 2, gamma 1 on mean token log-probs: pair 0: 2(-1) - 2(-2) - 1 = 1 -> softplus(-1)
    # = 0.3132617; pair 1: 2(-2) - 2(-1.5) - 1 = -2 -> softplus(2) = 2.1269280
    loss, stats = simpo_loss(_t(-1.0, -2.0), _t(-2.0, -1.5), beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx((0.3132617 + 2.1269280) / 2, abs=1e-6)
    # rewards beta x mean log-prob: chosen (-2, -4), rejected (-4, -3)
    assert stats.chosen_reward.item() == -3.0 and stats.rejected_reward.item() == -3.5
    assert stats.reward_accuracy.item() == 0.5 and stats.margin.item() == 0.5
    # equal likelihoods: the margin alone is the loss, softplus(gamma)
    loss, _ = simpo_loss(_t(-1.0), _t(-1.0), beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(math.log1p(math.e), abs=1e-6)


def test_orpo_hand_case():
    # log odds(x) = x - log(1 - e^x): x = -0.5 -> -0.5 + 0.9327521 = 0.4327521;
    # x = -1 -> -1 + 0.4586751 = -0.5413249. Pair 0 (-0.5 vs -1): log OR = 0.9740770 ->
    # softplus(-0.9740770) = 0.3202998; pair 1 swaps them: softplus(0.9740770) = 1.2943768.
    # L_SFT = -mean(-0.5, -1) = 0.75; loss = 0.75 + 0.1 x mean(0.3202998, 1.2943768)
    loss, stats = orpo_loss(_t(-0.5, -1.0), _t(-1.0, -0.5), lam=0.1)
    assert loss.item() == pytest.approx(0.75 + 0.1 * (0.3202998 + 1.2943768) / 2, abs=1e-6)
    assert stats.nll.item() == pytest.approx(0.75)
    assert stats.chosen_reward.item() == pytest.approx((0.4327521 - 0.5413249) / 2, abs=1e-6)
    assert stats.margin.item() == pytest.approx(0.0, abs=1e-12)  # +/- 0.9740770
    assert stats.reward_accuracy.item() == 0.5


def test_orpo_is_finite_when_the_likelihood_nears_one():
    chosen = torch.tensor([0.0, -1e-9, -1e-3, -30.0], dtype=torch.float32, requires_grad=True)
    loss, stats = orpo_loss(chosen, torch.full((4,), -2.0), lam=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(chosen.grad).all()
    assert torch.isfinite(stats.chosen_reward)


# KTO rows: r = log pi - log pi_ref = (1, -1, 0, -2); rows 0, 1 desirable, rows 2, 3 not.
KP, KR = _t(-1.0, -3.0, -2.0, -4.0), _t(-2.0, -2.0, -2.0, -2.0)
GOOD = torch.tensor([True, True, False, False])


def test_kto_hand_case_and_stats():
    # beta 0.5, z0 0.5, lambda_D 1, lambda_U 2. Desirable: sigmoid(-beta (r - z0)):
    # sigmoid(-0.25), sigmoid(0.75); undesirable: 2 sigmoid(-beta (z0 - r)): 2 sigmoid(-0.25),
    # 2 sigmoid(-1.25). Mean = (0.4378235 + 0.6791787 + 0.8756470 + 0.4454003) / 4
    loss, stats = kto_loss(KP, KR, GOOD, _t(0.5)[0], beta=0.5, undesirable_weight=2.0)
    assert loss.item() == pytest.approx(0.6095124, abs=1e-6)
    # r > z0 for row 0 only: rows 0, 2, 3 sit on their label's side
    assert stats.reward_accuracy.item() == 0.75
    assert stats.chosen_reward.item() == 0.0  # 0.5 x mean(1, -1)
    assert stats.rejected_reward.item() == -0.5  # 0.5 x mean(0, -2)
    assert stats.margin.item() == 0.5 and stats.kl.item() == 0.5


def test_kto_clamps_a_negative_kl_to_zero_and_never_backpropagates_it():
    kl = _t(-0.3)[0].requires_grad_()
    # z0 = 0: sigmoid(-0.5) + sigmoid(0.5) = 1; 2 sigmoid(0) = 1; 2 sigmoid(-1) = 0.5378828
    loss, stats = kto_loss(KP, KR, GOOD, kl, beta=0.5, undesirable_weight=2.0)
    assert loss.item() == pytest.approx((1 + 1 + 0.5378828) / 4, abs=1e-6)
    assert stats.kl.item() == 0.0
    assert not loss.requires_grad  # nothing but the detached kl had gradients


def test_kto_at_init_and_its_kl_estimate_from_mismatched_rows():
    logps = -5 * torch.rand(6, dtype=F64)
    loss, _ = kto_loss(logps, logps, GOOD.repeat(2)[:6], torch.tensor(0.0, dtype=F64), beta=0.1)
    assert loss.item() == pytest.approx(0.5)  # sigmoid(0) per row, lambda 1
    # mismatched rows: policy (-3, -1), reference (-2, -2) -> KL estimate mean(-1, 1) = 0
    assert kto_kl_estimate(_t(-3.0, -1.0), _t(-2.0, -2.0)).item() == 0.0
    assert kto_kl_estimate(_t(-1.0, -1.0), _t(-2.0, -3.0)).item() == 1.5


def test_registry_names_match_the_config_and_mark_the_reference_free_losses():
    assert tuple(PREFERENCE_LOSSES) == get_args(PreferenceLossName)
    free = [n for n, e in PREFERENCE_LOSSES.items() if not e.uses_reference]
    assert free == ["orpo", "simpo"]
    assert [n for n, e in PREFERENCE_LOSSES.items() if e.unpaired] == ["kto"]
    with pytest.raises(ValueError, match="dpo, ipo, cdpo, kto, orpo, simpo"):
        preference_loss_entry("hinge")


def test_registry_entries_are_the_loss_functions_on_scores():
    # sums and lengths: chosen (-3, -4) over (3, 2) tokens -> means (-1, -2); rejected (-4, -6)
    # over (2, 4) -> (-2, -1.5): the SimPO hand case above
    scores = PreferenceScores(_t(-3.0, -4.0), _t(-4.0, -6.0), _t(3.0, 2.0), _t(2.0, 4.0))
    params = _params(beta=2.0, simpo_gamma=1.0)
    loss, _ = preference_loss_entry("simpo").fn(scores, params)
    assert loss.item() == pytest.approx((0.3132617 + 2.1269280) / 2, abs=1e-6)
    orpo, _ = preference_loss_entry("orpo").fn(scores, _params(beta=0.1))
    assert orpo.item() == pytest.approx(orpo_loss(_t(-1.0, -2.0), _t(-2.0, -1.5), 0.1)[0].item())

    pairs = PreferenceScores(PC, PR, _t(1.0, 1.0), _t(1.0, 1.0), RC, RR)
    smooth = _params(beta=0.5, label_smoothing=0.1)
    assert preference_loss_entry("dpo").fn(pairs, smooth)[0].item() == pytest.approx(
        (0.3132617 + 0.9740770) / 2, abs=1e-6
    )  # dpo ignores label_smoothing; cdpo reads it
    assert preference_loss_entry("cdpo").fn(pairs, smooth)[0].item() == pytest.approx(
        (0.4132617 + 0.9240770) / 2, abs=1e-6
    )
    assert preference_loss_entry("ipo").fn(pairs, smooth)[0].item() == pytest.approx(2.5)


def test_registry_kto_estimates_the_kl_from_the_mismatched_side_unless_given_one():
    # mismatched side: policy (-1.5, -2.5, -1.5, -2.5) vs reference -2 -> KL mean(0.5, -0.5) = 0
    mismatched = _t(-1.5, -2.5, -1.5, -2.5)
    ones = torch.ones(4, dtype=F64)
    scores = PreferenceScores(KP, mismatched, ones, ones, KR, KR, GOOD)
    params = _params(beta=0.5, undesirable_weight=2.0)
    _, stats = preference_loss_entry("kto").fn(scores, params)
    assert stats.kl.item() == 0.0
    given = PreferenceScores(KP, mismatched, ones, ones, KR, KR, GOOD, kl=_t(0.5)[0])
    loss, stats = preference_loss_entry("kto").fn(given, params)
    assert stats.kl.item() == 0.5 and loss.item() == pytest.approx(0.6095124, abs=1e-6)


def _toy_step(name: str, params: LossParams) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-token 'policy' softmax(theta) over 4 responses, theta = 0 = the reference: one SGD
    step of loss `name` with response 0 chosen (KTO: desirable) and 1 rejected (undesirable).
    Returns log pi before and after the step, [4] each."""
    theta = torch.zeros(4, dtype=F64, requires_grad=True)
    logp = theta.log_softmax(0)
    ref = logp.detach()
    one = torch.ones(2, dtype=F64)
    if PREFERENCE_LOSSES[name].unpaired:  # rows (0, desirable), (1, undesirable); KL on 2 and 3
        scores = PreferenceScores(
            logp[[0, 1]], logp[[2, 3]], one, one, ref[[0, 1]], ref[[2, 3]], torch.tensor([1, 0])
        )
    else:
        scores = PreferenceScores(logp[[0]], logp[[1]], one[:1], one[:1], ref[[0]], ref[[1]])
    loss, _ = PREFERENCE_LOSSES[name].fn(scores, params)
    loss.backward()
    with torch.no_grad():
        after = (theta - 0.1 * theta.grad).log_softmax(0)
    return ref, after


@pytest.mark.parametrize("name", get_args(PreferenceLossName))
def test_a_gradient_step_raises_the_chosen_and_lowers_the_rejected_completion(name):
    before, after = _toy_step(name, _params(beta=0.5, label_smoothing=0.1, simpo_gamma=0.5))
    assert after[0] > before[0], (name, before, after)  # chosen / desirable
    assert after[1] < before[1], (name, before, after)  # rejected / undesirable


def test_dpo_rejects_bad_arguments():
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, beta=0.0)
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError):
        ipo_loss(PC, PR, RC, RR, tau=0.0)


def test_bradley_terry_hand_case_with_margin():
    rc = torch.tensor([2.0, 0.0], dtype=F64, requires_grad=True)
    rr = torch.tensor([0.0, 1.0], dtype=F64)
    # -log sigmoid(2) = log(1 + e^-2) = 0.1269280; -log sigmoid(-1) = log(1 + e) = 1.3132617
    loss, acc = bradley_terry_loss(rc, rr)
    assert loss.item() == pytest.approx((0.1269280 + 1.3132617) / 2, abs=1e-6)
    assert acc.item() == 0.5
    # margin (1, 0): pair 0 becomes -log sigmoid(1) = 0.3132617; accuracy ignores the margin
    loss, acc = bradley_terry_loss(rc, rr, margin=torch.tensor([1.0, 0.0], dtype=F64))
    assert loss.item() == pytest.approx((0.3132617 + 1.3132617) / 2, abs=1e-6)
    assert acc.item() == 0.5
    loss.backward()
    # d/drc -log sigmoid(d) = -sigmoid(-d): d = 1 -> -0.2689414, d = -1 -> -0.7310586; / 2
    expected = torch.tensor([-0.2689414, -0.7310586], dtype=F64) / 2
    torch.testing.assert_close(rc.grad, expected, atol=1e-6, rtol=0)


def test_sequence_logps_sums_valid_tokens():
    lp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, 9.0, -float("inf")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sequence_logps(lp, mask).tolist() == [-3.0, -0.5]
    assert sequence_logps(lp, torch.zeros(2, 3)).tolist() == [0.0, 0.0]
