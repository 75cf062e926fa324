"""The pure parts of the preference roles: pair log-probs on the batch layout, the scores every
loss reads from one forward pass, stats, held-out implicit-reward evaluation."""

import math
from dataclasses import astuple
from typing import get_args

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rayrlhf.algorithms.preference import (
    PREFERENCE_LOSSES,
    LossParams,
    dpo_loss,
    preference_loss_entry,
)
from rayrlhf.config import PreferenceLossName
from rayrlhf.data.preferences import PreferenceSet
from rayrlhf.types import micro_batches
from rayrlhf.workers.dpo import (
    DPOStepStats,
    PairLogps,
    batch_scores,
    mean_dpo_stats,
    pair_logps,
    pair_logps_batched,
    preference_eval,
    set_scores,
    step_batch,
)

PAD = 0


def _params(**kw: float) -> LossParams:
    """Loss hyper-parameters: beta 0.1, no smoothing, gamma 0.5, KTO weights 1, except `kw`."""
    base = dict(beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, desirable_weight=1.0)
    return LossParams(**{**base, "undesirable_weight": 1.0, **kw})


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return _tiny_llama()


@pytest.fixture(scope="module")
def pairs():
    # prompts and responses of different lengths, so every row is padded somewhere
    return PreferenceSet(
        prompts=("a", "b", "c"),
        prompt_ids=((5, 6, 7), (8,), (9, 10)),
        chosen_ids=((11, 12, 2), (13, 2), (14, 15, 16, 17, 2)),
        rejected_ids=((18, 2), (19, 20, 21, 2), (22, 2)),
        pad_id=PAD,
    )


def _unpadded_logp(model, prompt, response) -> float:
    """log p(response | prompt) of one unpadded row, token by token."""
    ids = torch.tensor([list(prompt) + list(response)])
    logits = model(input_ids=ids).logits.log_softmax(-1)[0]
    return sum(logits[len(prompt) + j - 1, t].item() for j, t in enumerate(response))


def test_pair_logps_equal_unpadded_sequence_logprobs(model, pairs):
    with torch.no_grad():
        chosen, rejected = pair_logps(model, pairs.batch([0, 1, 2]))
    for i in range(3):
        want_c = _unpadded_logp(model, pairs.prompt_ids[i], pairs.chosen_ids[i])
        want_r = _unpadded_logp(model, pairs.prompt_ids[i], pairs.rejected_ids[i])
        assert chosen[i].item() == pytest.approx(want_c, abs=1e-4)
        assert rejected[i].item() == pytest.approx(want_r, abs=1e-4)


def test_micro_batching_does_not_change_pair_logps(model, pairs):
    batch = pairs.batch([2, 0, 1])
    whole = pair_logps_batched(model, batch, size=3)
    for size in (1, 2):
        parts = pair_logps_batched(model, batch, size=size)
        for a, b in zip(whole, parts):
            assert torch.allclose(a, b, atol=1e-5)


def test_dpo_loss_on_pair_logps_starts_at_log2_and_has_gradients(model, pairs):
    batch = pairs.batch([0, 1, 2])
    chosen, rejected = pair_logps(model, batch)
    loss, stats = dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats.reward_accuracy.item() == 0.0  # ties are not wins
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad()


def test_mean_dpo_stats_is_field_wise_and_keeps_absent_fields_absent():
    a = DPOStepStats(1.0, 0.5, 0.2, -0.2, 0.4, kl=0.1)
    b = DPOStepStats(3.0, 1.0, 0.4, -0.6, 1.0, kl=0.3)
    mean = mean_dpo_stats([a, b])
    assert astuple(mean) == pytest.approx((2.0, 0.75, 0.3, -0.4, 0.7, None, 0.2))
    assert mean.nll is None


def _held_out(policy, ref=None, desirable=None):
    """Scores of four held-out pairs (KTO: rows): chosen responses 1 token, rejected 2."""
    rows = PreferenceSet(("p",) * 4, ((1,),) * 4, ((2,),) * 4, ((3, 2),) * 4, PAD)
    return set_scores(rows, PairLogps(*policy), ref, desirable)


def test_preference_eval_counts_strict_wins_of_the_losses_own_reward():
    ref = PairLogps(torch.full((4,), -5.0), torch.full((4,), -5.0))
    policy = (torch.tensor([-4.0, -6.0, -5.0, -3.0]), torch.tensor([-5.0, -5.0, -5.0, -4.0]))
    stats = preference_eval("dpo", _params(beta=0.5), _held_out(policy, ref))
    # margins: 0.5, -0.5, 0 (a tie is not a win), 0.5
    assert stats.reward_accuracy == 0.5
    assert stats.margin == pytest.approx(0.125)
    assert stats.pairs == 4
    # SimPO's reward is beta x the mean token log-prob: chosen 1 token, rejected 2
    simpo = preference_eval("simpo", _params(beta=1.0), _held_out(policy))
    # chosen (-4, -6, -5, -3) vs rejected (-2.5, -2.5, -2.5, -2): no pair wins
    assert simpo.reward_accuracy == 0.0
    assert simpo.margin == pytest.approx(-2.125)  # mean of -1.5, -3.5, -2.5, -1


def test_preference_eval_of_kto_places_rows_against_the_reference_point():
    ref = PairLogps(torch.full((4,), -5.0), torch.full((4,), -5.0))
    # r = (1, -1, 0, -2); the mismatched side's log-ratios (1, 0, -1, 0) give z0 = 0
    policy = (torch.tensor([-4.0, -6.0, -5.0, -7.0]), torch.tensor([-4.0, -5.0, -6.0, -5.0]))
    desirable = torch.tensor([True, True, False, False])
    stats = preference_eval("kto", _params(beta=0.1), _held_out(policy, ref, desirable))
    assert stats.reward_accuracy == 0.75  # rows 0, 2 (r = 0 is not above 0), 3
    assert stats.margin == pytest.approx(0.1 * (0.0 - (-1.0)))


def test_step_batch_keeps_reference_logps_and_labels_with_their_rows(pairs):
    ref = PairLogps(torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-4.0, -5.0, -6.0]))
    labels = torch.tensor([True, False, True])
    batch = step_batch(pairs.batch([0, 1, 2]), ref, labels)
    parts = micro_batches(batch, 2)
    assert [len(p) for p in parts] == [2, 1]
    assert parts[1].ref_chosen.tolist() == [-3.0] and parts[1].ref_rejected.tolist() == [-6.0]
    assert parts[1].desirable.tolist() == [True]
    assert torch.equal(parts[1].chosen_sequences, batch.chosen_sequences[2:])
    free = step_batch(pairs.batch([0, 1]), None, None)  # reference-free pairs
    assert free.ref_chosen.tolist() == [0.0, 0.0] and free.desirable.all()


def test_batch_scores_count_response_tokens_and_give_orpo_its_sft_term(model, pairs):
    batch = step_batch(pairs.batch([0, 1, 2]), None, None)
    scores = batch_scores(model, batch, preference_loss_entry("orpo"))
    assert scores.chosen_tokens.tolist() == [3.0, 2.0, 5.0]
    assert scores.rejected_tokens.tolist() == [2.0, 4.0, 2.0]
    assert scores.ref_chosen is None and scores.desirable is None
    _, stats = preference_loss_entry("orpo").fn(scores, _params())
    # the SFT term is the chosen responses' per-token NLL, from the same forward pass
    want = [
        -_unpadded_logp(model, pairs.prompt_ids[i], pairs.chosen_ids[i]) / len(pairs.chosen_ids[i])
        for i in range(3)
    ]
    assert stats.nll.item() == pytest.approx(sum(want) / 3, abs=1e-5)


def test_batch_scores_of_kto_estimate_the_kl_on_the_mismatched_side(model, pairs):
    ref = PairLogps(torch.full((3,), -9.0), torch.full((3,), -9.0))
    batch = step_batch(pairs.batch([0, 1, 2]), ref, torch.tensor([True, False, True]))
    scores = batch_scores(model, batch, preference_loss_entry("kto"))
    assert scores.desirable.tolist() == [True, False, True]
    assert scores.kl.item() == pytest.approx((scores.rejected.detach() + 9.0).mean().item())
    assert not scores.kl.requires_grad


@pytest.mark.parametrize("name", get_args(PreferenceLossName))
def test_one_step_on_a_real_model_widens_the_losses_own_margin(name, pairs):
    net = _tiny_llama()  # a fresh copy: this test trains it
    entry, params = PREFERENCE_LOSSES[name], _params(beta=0.5, label_smoothing=0.1)
    with torch.no_grad():
        ref = PairLogps(*pair_logps(net, pairs.batch([0, 1, 2])))
    labels = torch.tensor([True, False, True]) if entry.unpaired else None
    batch = step_batch(pairs.batch([0, 1, 2]), ref, labels)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    margins = []
    for _ in range(2):
        loss, stats = entry.fn(batch_scores(net, batch, entry), params)
        margins.append(stats.margin.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert margins[1] > margins[0], (name, margins)
