import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rayrlhf.algorithms.experience import (
    assemble_rollout,
    make_experience,
    update_gives_old_logprobs,
    with_update_logprobs,
)
from rayrlhf.config import AlgorithmConfig
from rayrlhf.types import (
    Experience,
    RewardOutput,
    Rollout,
    Sample,
    Scores,
    micro_batches,
    shard_rows,
)

REPO = Path(__file__).resolve().parents[2]
PAD = 0


def test_rollout_module_does_not_import_vllm():
    code = (
        "import sys, rayrlhf.workers.rollout, rayrlhf.algorithms.experience; "
        "print('vllm' in sys.modules or any(m.startswith('vllm.') for m in sys.modules))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def _samples():
    a = Sample(
        prompt_ids=[11, 12], response_ids=[21, 22, 23], logprobs=[-0.1, -0.2, -0.3], text="abc"
    )
    b = Sample(prompt_ids=[31, 32, 33, 34], response_ids=[41], logprobs=[-0.4], text="d")
    return [a, b]


def test_assemble_rollout_layout():
    r = assemble_rollout(_samples(), ["pa", "pb"], pad_id=PAD)
    # P = 4 (longest prompt), R = 3 (longest response)
    assert r.prompt_len == 4
    assert r.sequences.tolist() == [
        [PAD, PAD, 11, 12, 21, 22, 23],
        [31, 32, 33, 34, 41, PAD, PAD],
    ]
    assert r.sequences.dtype == torch.int64
    assert r.attention_mask.tolist() == [
        [0, 0, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 0, 0],
    ]
    assert r.action_mask.dtype == torch.float32
    assert r.action_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    torch.testing.assert_close(
        r.engine_logprobs, torch.tensor([[-0.1, -0.2, -0.3], [-0.4, 0.0, 0.0]])
    )
    # Every response starts at column P.
    assert r.sequences[0, r.prompt_len].item() == 21
    assert r.sequences[1, r.prompt_len].item() == 41
    assert r.prompts == ("pa", "pb") and r.responses == ("abc", "d")
    assert len(r) == 2


def test_assemble_rollout_uses_pad_id_and_checks_lengths():
    r = assemble_rollout(_samples(), ["pa", "pb"], pad_id=99)
    assert r.sequences[0, :2].tolist() == [99, 99]
    assert r.sequences[1, 5:].tolist() == [99, 99]
    assert r.attention_mask[0, :2].tolist() == [0, 0]  # mask does not depend on the pad id
    with pytest.raises(ValueError):
        assemble_rollout(_samples(), ["only one"], pad_id=PAD)


def _rollout_and_scores(rewards=(2.0, -1.0)):
    r = assemble_rollout(_samples(), ["pa", "pb"], pad_id=PAD)
    zeros = torch.zeros(2, 3)
    scores = Scores(
        rewards=torch.tensor(rewards),
        ref_logprobs=r.engine_logprobs.clone(),
        old_logprobs=r.engine_logprobs.clone(),
        values=zeros,
    )
    return r, scores


def test_reward_to_go_with_no_discount_no_kl_zero_values():
    r, scores = _rollout_and_scores()
    ppo = AlgorithmConfig(gamma=1.0, lam=1.0, kl_coef=0.0, whiten_advantages=False)
    exp, stats = make_experience(r, scores, ppo, ppo.kl_coef)
    # With gamma = lam = 1, no KL and V = 0, every action token's return is the terminal reward.
    assert exp.returns.tolist() == [[2.0, 2.0, 2.0], [-1.0, 0.0, 0.0]]
    assert exp.advantages.tolist() == [[2.0, 2.0, 2.0], [-1.0, 0.0, 0.0]]
    assert stats.reward_mean == pytest.approx(0.5)
    assert stats.reward_std == pytest.approx(2.1213203)  # sample std of (2, -1) = 3 / sqrt(2)
    assert stats.response_length == pytest.approx(2.0)
    assert stats.tokens == 4
    assert stats.kl == 0.0
    assert exp.sequences is r.sequences and exp.action_mask is r.action_mask


def test_discount_is_applied_per_token():
    r, scores = _rollout_and_scores()
    ppo = AlgorithmConfig(gamma=0.5, lam=1.0, kl_coef=0.0, whiten_advantages=False)
    exp, _ = make_experience(r, scores, ppo, ppo.kl_coef)
    # Row 0: reward 2 at the last of 3 tokens -> 2 * 0.5^2, 2 * 0.5, 2.
    torch.testing.assert_close(exp.returns[0], torch.tensor([0.5, 1.0, 2.0]))


def test_kl_penalty_and_kl_stat_by_hand():
    r, scores = _rollout_and_scores(rewards=(1.0, 0.0))
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 7.0, 7.0]])  # 7.0: garbage on padding
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -9.0, 3.0]])
    scores = Scores(
        rewards=scores.rewards, ref_logprobs=ref, old_logprobs=old, values=scores.values
    )
    beta = 0.1
    ppo = AlgorithmConfig(
        gamma=1.0, lam=1.0, kl_coef=beta, whiten_advantages=False, kl_estimator="k1"
    )
    exp, stats = make_experience(r, scores, ppo, ppo.kl_coef)
    # k1 = old - ref on real tokens: row 0 -> 0.5, -1.0, 0.0 (sum -0.5); row 1 -> -0.2 (sum -0.2)
    assert stats.kl == pytest.approx((-0.5 + -0.2) / 2)
    # token rewards: row 0 -> -0.05, 0.1, 0 + 1 ; row 1 -> 0.02 ; reward-to-go with V = 0:
    torch.testing.assert_close(exp.returns, torch.tensor([[1.05, 1.1, 1.0], [0.02, 0.0, 0.0]]))


def test_whitened_advantages_are_zero_mean_on_real_tokens():
    r, scores = _rollout_and_scores()
    exp, _ = make_experience(r, scores, AlgorithmConfig(whiten_advantages=True), 0.0)
    real = exp.advantages[r.action_mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    assert exp.advantages[~r.action_mask.bool()].abs().sum().item() == 0.0


def test_engine_logprob_diff_ignores_padding():
    r, scores = _rollout_and_scores()
    old = r.engine_logprobs.clone()
    old[0, 1] += 0.25  # a real token, trainer higher by 0.25
    old[1, 0] -= 0.125  # a real token, trainer lower by 0.125
    old[1, 2] = 1.0e6  # a padding position: must be ignored
    scores = Scores(
        rewards=scores.rewards, ref_logprobs=old.clone(), old_logprobs=old, values=scores.values
    )
    _, stats = make_experience(r, scores, AlgorithmConfig(), 0.0)
    assert stats.engine_logprob_diff == pytest.approx(0.25)
    real = r.action_mask.sum().item()  # the mean is over real tokens only
    assert stats.engine_logprob_gap_mean == pytest.approx((0.25 + 0.125) / real)


def test_engine_logprob_diff_zero_when_equal():
    r, scores = _rollout_and_scores()
    _, stats = make_experience(r, scores, AlgorithmConfig(), 0.05)
    assert stats.engine_logprob_diff == 0.0


# ---- shard_rows / micro_batches / Experience.split ---------------------------------------------


def _experience(b=6, t=5, r=3):
    base = torch.arange(b, dtype=torch.float32).unsqueeze(1)  # row i holds i everywhere
    return Experience(
        sequences=base.long().expand(b, t).clone(),
        attention_mask=torch.ones(b, t, dtype=torch.long),
        action_mask=torch.ones(b, r),
        old_logprobs=-base.expand(b, r).clone(),
        ref_logprobs=-2 * base.expand(b, r),
        old_values=10 + base.expand(b, r),
        advantages=100 + base.expand(b, r),
        returns=1000 + base.expand(b, r),
    )


def _row_ids(exp):
    ids = exp.sequences[:, 0].tolist()
    assert (-exp.old_logprobs[:, 0]).tolist() == ids
    assert (-exp.ref_logprobs[:, 0] / 2).tolist() == ids
    assert (exp.old_values[:, 0] - 10).tolist() == ids
    assert (exp.advantages[:, 0] - 100).tolist() == ids
    assert (exp.returns[:, 0] - 1000).tolist() == ids
    return ids


def test_split_keeps_rows_aligned():
    shards = _experience(6).split(3)
    assert [len(s) for s in shards] == [2, 2, 2]
    assert [_row_ids(s) for s in shards] == [[0, 1], [2, 3], [4, 5]]
    assert all(isinstance(s, Experience) for s in shards)


def test_split_uneven_raises():
    with pytest.raises(ValueError, match="6 rows"):
        _experience(6).split(4)
    with pytest.raises(ValueError):
        shard_rows(_experience(5), 2)


def test_micro_batches_cover_all_rows_in_order():
    chunks = micro_batches(_experience(7), 3)
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert [i for c in chunks for i in _row_ids(c)] == list(range(7))


def test_shard_rows_on_rollout_keeps_texts_aligned():
    samples = [Sample([i + 1], [i + 1] * (i + 1), [-0.5] * (i + 1), f"r{i}") for i in range(4)]
    r = assemble_rollout(samples, [f"p{i}" for i in range(4)], pad_id=PAD)
    halves = shard_rows(r, 2)
    assert [h.prompts for h in halves] == [("p0", "p1"), ("p2", "p3")]
    assert [h.responses for h in halves] == [("r0", "r1"), ("r2", "r3")]
    for h in halves:
        assert isinstance(h, Rollout) and h.prompt_len == r.prompt_len
        for k in range(len(h)):
            # row k's prompt token, its response length and its response text all agree
            i = int(h.sequences[k, h.prompt_len - 1]) - 1
            assert h.responses[k] == f"r{i}"
            assert h.action_mask[k].sum().item() == i + 1


# ---- critic-free estimators, reward shaping, loss normalisers ----------------------------------


def _group_rollout(rewards, lengths):
    """A rollout whose rows have the given response lengths (R = max), with zero KL."""
    samples = [Sample([1], [5] * n, [-0.5] * n, "x") for n in lengths]
    r = assemble_rollout(samples, ["p"] * len(samples), pad_id=PAD)
    zeros = torch.zeros_like(r.action_mask)
    return r, Scores(torch.tensor(rewards), zeros, zeros, zeros)


def test_grpo_path_broadcasts_group_normalised_rewards_over_tokens():
    # Two prompts x 2 samples: groups (1, 0) and (3, 3).
    r, scores = _group_rollout([1.0, 0.0, 3.0, 3.0], [2, 1, 3, 2])
    algo = AlgorithmConfig(advantage="grpo", n_samples_per_prompt=2, rollout_batch_size=4)
    exp, _ = make_experience(r, scores, algo, kl_coef=0.0)
    # Group 1: mean 0.5, unbiased std 0.7071 -> +-0.7071; group 2 is all equal -> 0.
    a = 0.5 / (0.5**0.5)
    expected = torch.tensor([[a, a, 0], [-a, 0, 0], [0, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(exp.advantages, expected, atol=1e-4, rtol=0)
    assert exp.returns.abs().sum() == 0  # no critic: nothing to regress


def test_rloo_path_charges_the_kl_penalty_to_the_sequence_reward():
    r, scores = _group_rollout([1.0, 1.0], [2, 2])
    ref = torch.tensor([[-1.0, -1.0], [0.0, 0.0]])  # row 0 has k1 = 0.5 per token vs old -0.5
    scores = Scores(scores.rewards, ref, torch.full_like(ref, -0.5), scores.values)
    algo = AlgorithmConfig(advantage="rloo", n_samples_per_prompt=2, rollout_batch_size=2)
    exp, stats = make_experience(r, scores, algo, kl_coef=0.1)
    # Row 0: kl sum = 2 x 0.5 = 1.0 -> shaped 1 - 0.1 = 0.9; row 1: kl = -0.5 x 2 -> 1.1.
    # RLOO: 0.9 - 1.1 = -0.2 and 1.1 - 0.9 = +0.2, on every action token.
    torch.testing.assert_close(exp.advantages, torch.tensor([[-0.2, -0.2], [0.2, 0.2]]))
    assert stats.kl == pytest.approx((1.0 - 1.0) / 2)


def test_kl_in_loss_mode_adds_no_reward_penalty():
    r, scores = _group_rollout([1.0, 0.0], [2, 2])
    ref = torch.full_like(r.action_mask, -2.0)
    scores = Scores(scores.rewards, ref, torch.full_like(ref, -0.5), scores.values)
    base = dict(advantage="rloo", n_samples_per_prompt=2, rollout_batch_size=2)
    in_loss, _ = make_experience(r, scores, AlgorithmConfig(kl_mode="loss", **base), 0.5)
    no_kl, _ = make_experience(r, scores, AlgorithmConfig(**base), 0.0)
    torch.testing.assert_close(in_loss.advantages, no_kl.advantages)
    torch.testing.assert_close(in_loss.ref_logprobs, ref)  # carried to the policy loss


def test_reward_clip_applies_before_the_estimator():
    r, scores = _group_rollout([10.0, -10.0], [1, 1])
    algo = AlgorithmConfig(
        advantage="rloo", n_samples_per_prompt=2, rollout_batch_size=2, reward_clip=1.0
    )
    exp, _ = make_experience(r, scores, algo, 0.0)
    # Clipped to (1, -1): RLOO gives 1 - (-1) = 2 and -2.
    torch.testing.assert_close(exp.advantages[:, 0], torch.tensor([2.0, -2.0]))


def test_loss_norms_sum_each_optimizer_step_over_ranks():
    from rayrlhf.algorithms.experience import loss_norms

    # 8 rows, lengths 1..8, 2 ranks x 2 mini-batches: rank r holds rows [4r, 4r+4), and its
    # mini-batch k is rows [4r+2k, 4r+2k+2).
    r, scores = _group_rollout([0.0] * 8, list(range(1, 9)))
    exp, _ = make_experience(
        r,
        scores,
        AlgorithmConfig(advantage="rloo", n_samples_per_prompt=2, rollout_batch_size=8),
        0.0,
    )
    norms = loss_norms(exp, ranks=2, mini_batches=2, max_len=16)
    # Step 0: rows 0,1 (1+2) and rows 4,5 (5+6) = 14 tokens; step 1: 3+4 + 7+8 = 22.
    assert [n.tokens for n in norms] == [14, 22]
    assert [n.sequences for n in norms] == [4, 4]
    assert all(n.max_len == 16 for n in norms)


def test_grpo_without_groups_is_rejected_before_anything_runs():
    with pytest.raises(ValueError, match="n_samples_per_prompt >= 2"):
        AlgorithmConfig(advantage="grpo", n_samples_per_prompt=1)
    with pytest.raises(ValueError, match="divisible by algorithm.n_samples_per_prompt"):
        AlgorithmConfig(advantage="grpo", n_samples_per_prompt=3, rollout_batch_size=32)


def test_only_one_on_policy_pass_with_the_kl_in_the_loss_leaves_old_logprobs_to_the_update():
    single = AlgorithmConfig(ppo_epochs=1, num_mini_batches=1, kl_mode="loss")
    assert update_gives_old_logprobs(single)
    assert not update_gives_old_logprobs(single.model_copy(update={"ppo_epochs": 2}))
    assert not update_gives_old_logprobs(single.model_copy(update={"num_mini_batches": 2}))
    assert not update_gives_old_logprobs(single.model_copy(update={"kl_mode": "reward"}))


def test_update_logprobs_give_the_figures_the_score_phase_would():
    """Without old logprobs the KL and engine agreement wait (NaN), then come out as they
    would have from the same logprobs at scoring; the advantages do not depend on them."""
    r, scores = _rollout_and_scores(rewards=(1.0, 0.0))
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 7.0, 7.0]])  # 7.0: garbage on padding
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -9.0, 3.0]])
    scores = replace(scores, ref_logprobs=ref, old_logprobs=old)
    algo = AlgorithmConfig(kl_mode="loss", kl_estimator="k1", whiten_advantages=False)
    full_exp, full = make_experience(r, scores, algo, 0.1)
    exp, waiting = make_experience(r, replace(scores, old_logprobs=None), algo, 0.1)
    assert exp.old_logprobs is None and torch.equal(exp.advantages, full_exp.advantages)
    assert math.isnan(waiting.kl) and math.isnan(waiting.engine_logprob_diff)
    filled = with_update_logprobs(waiting, r, ref, old, algo)
    assert filled == full
    assert filled.kl == pytest.approx((-0.5 + -0.2) / 2)  # padding's garbage is masked out
    with pytest.raises(ValueError, match="KL penalty in the reward"):
        make_experience(
            r,
            replace(scores, old_logprobs=None),
            algo.model_copy(update={"kl_mode": "reward"}),
            0.1,
        )


def test_shards_keep_a_missing_field_missing():
    r, scores = _rollout_and_scores()
    exp, _ = make_experience(
        r, replace(scores, old_logprobs=None), AlgorithmConfig(kl_mode="loss"), 0.0
    )
    parts = shard_rows(exp, 2) + micro_batches(exp, 1)
    assert all(p.old_logprobs is None and len(p) == 1 for p in parts)


def _with_validity(scores: Scores, valid: list[bool]) -> Scores:
    """`scores` whose reward output marks `valid`; invalid rewards are the placeholder 0."""
    v = torch.tensor(valid)
    rewards = torch.where(v, scores.rewards, torch.zeros_like(scores.rewards))
    return replace(scores, rewards=rewards, reward=RewardOutput(rewards, v, {}))


def test_reward_statistics_average_only_the_valid_samples():
    r, scores = _group_rollout([1.0, 3.0, 9.0, 2.0], [1, 1, 1, 1])
    algo = AlgorithmConfig(advantage="grpo", n_samples_per_prompt=2, rollout_batch_size=4)
    _, stats = make_experience(r, _with_validity(scores, [True, True, False, True]), algo, 0.0)
    assert stats.reward_mean == pytest.approx(2.0)  # (1 + 3 + 2) / 3, not 6 / 4
    assert stats.reward_std == pytest.approx(1.0)  # sample std of (1, 3, 2)
    _, one = make_experience(r, _with_validity(scores, [False, True, False, False]), algo, 0.0)
    assert one.reward_mean == pytest.approx(3.0) and one.reward_std == 0.0
    _, none = make_experience(r, _with_validity(scores, [False] * 4), algo, 0.0)
    assert math.isnan(none.reward_mean) and math.isnan(none.reward_std)


def test_grpo_path_leaves_invalid_samples_out_of_their_group():
    # Group 1: (1, 0) both valid; group 2: (3, placeholder 0 of an invalid sample).
    r, scores = _group_rollout([1.0, 0.0, 3.0, 0.0], [1, 1, 1, 1])
    algo = AlgorithmConfig(advantage="grpo", n_samples_per_prompt=2, rollout_batch_size=4)
    exp, _ = make_experience(r, _with_validity(scores, [True, True, True, False]), algo, 0.0)
    a = 0.5 / (0.5**0.5)
    # Group 2 has one valid sample: no baseline, advantage 0 (it was +-a with the 0 counted).
    expected = torch.tensor([a, -a, 0.0, 0.0])
    torch.testing.assert_close(exp.advantages[:, 0], expected, atol=1e-4, rtol=0)


def test_running_reward_normalisation_sees_only_valid_rewards():
    from rayrlhf.algorithms.rewards import RunningMoments

    r, scores = _group_rollout([1.0, 3.0, 0.0, 0.0], [1, 1, 1, 1])
    algo = AlgorithmConfig(
        advantage="rloo", n_samples_per_prompt=2, rollout_batch_size=4, reward_normalize=True
    )
    moments = RunningMoments()
    scores = _with_validity(scores, [True, True, False, False])
    exp, _ = make_experience(r, scores, algo, 0.0, moments)
    assert moments.count == 2 and moments.mean == pytest.approx(2.0)
    # Normalised by std sqrt(2): RLOO on (1, 3) / sqrt 2 -> -+2 / sqrt 2; the invalid pair 0.
    expected = torch.tensor([-(2**0.5), 2**0.5, 0.0, 0.0])
    torch.testing.assert_close(exp.advantages[:, 0], expected)
