"""The pure parts of the DPO roles: pair log-probs on the batch layout, stats, implicit rewards."""

import math
from dataclasses import astuple

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rayrlhf.algorithms.preference import dpo_loss
from rayrlhf.data.preferences import PreferenceSet
from rayrlhf.workers.dpo import (
    DPOStepStats,
    PairLogps,
    implicit_reward_eval,
    mean_dpo_stats,
    pair_logps,
    pair_logps_batched,
)

PAD = 0


@pytest.fixture(scope="module")
def model():
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


def test_mean_dpo_stats_is_field_wise():
    a = DPOStepStats(1.0, 0.5, 0.2, -0.2, 0.4)
    b = DPOStepStats(3.0, 1.0, 0.4, -0.6, 1.0)
    mean = mean_dpo_stats([a, b])
    assert astuple(mean) == pytest.approx((2.0, 0.75, 0.3, -0.4, 0.7))


def test_implicit_reward_eval_counts_strict_wins():
    ref = PairLogps(torch.tensor([-5.0, -5.0, -5.0, -5.0]), torch.tensor([-5.0] * 4))
    policy = PairLogps(
        torch.tensor([-4.0, -6.0, -5.0, -3.0]), torch.tensor([-5.0, -5.0, -5.0, -4.0])
    )
    stats = implicit_reward_eval(policy, ref, beta=0.5)
    # margins: 0.5, -0.5, 0 (a tie is not a win), 0.5
    assert stats.reward_accuracy == 0.5
    assert stats.margin == pytest.approx(0.125)
    assert stats.pairs == 4
