"""The pure parts of the RM and SFT roles: pair scoring under padding, weighted eval, the
response-only SFT loss, and turning a causal LM into a scalar reward model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rayrlhf.data.demonstrations import SFTSet
from rayrlhf.data.preferences import PreferenceSet
from rayrlhf.data.reward_pairs import RewardPairSet
from rayrlhf.models.forward import sequence_scores
from rayrlhf.recipes.rm import init_reward_model, is_scalar_classifier
from rayrlhf.workers.reward_trainer import (
    RMStepStats,
    mean_rm_stats,
    pair_scores,
    weighted_pair_eval,
)
from rayrlhf.workers.sft import response_nll

PAD = 0


def _config() -> LlamaConfig:
    return LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=PAD,
                       num_labels=1)  # fmt: skip


@pytest.fixture(scope="module")
def rm():
    torch.manual_seed(0)
    return LlamaForSequenceClassification(_config()).eval()


@torch.no_grad()
def test_pair_scores_read_the_last_real_token_whatever_the_padding(rm):
    # pair 0 has a short prompt and long chosen response, pair 1 the reverse: both pad sides used
    pairs = PreferenceSet(
        prompts=("a", "b"),
        prompt_ids=((5, 6), (7, 8, 9, 10)),
        chosen_ids=((11, 12, 13, 2), (14, 2)),
        rejected_ids=((15, 2), (16, 17, 18, 2)),
        pad_id=PAD,
    )
    chosen, rejected = pair_scores(rm, RewardPairSet(pairs, (0.0, 0.0)).batch([0, 1]))
    for i in range(2):
        for got, resp in ((chosen[i], pairs.chosen_ids[i]), (rejected[i], pairs.rejected_ids[i])):
            row = torch.tensor([list(pairs.prompt_ids[i]) + list(resp)])
            alone = sequence_scores(rm, row, torch.ones_like(row))
            assert got.item() == pytest.approx(alone.item(), abs=1e-5)


def test_weighted_eval_ignores_padding_rows_and_applies_the_margin():
    chosen, rejected = torch.tensor([1.0, 0.0, 5.0]), torch.tensor([0.0, 1.0, -5.0])
    margin, weight = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    loss, correct, total = weighted_pair_eval(chosen, rejected, margin, weight)
    expected = -math.log(1 / (1 + math.exp(-1))) - math.log(1 / (1 + math.exp(1)))
    assert (correct, total) == (1.0, 2.0)
    assert loss == pytest.approx(expected, rel=1e-5)
    loss_m, *_ = weighted_pair_eval(chosen, rejected, torch.tensor([1.0, 0.0, 0.0]), weight)
    assert loss_m == pytest.approx(math.log(2) - math.log(1 / (1 + math.exp(1))), rel=1e-5)


def test_mean_rm_stats_is_fieldwise():
    s = mean_rm_stats([RMStepStats(1.0, 0.5, 2.0, -2.0), RMStepStats(3.0, 1.0, 0.0, 0.0)])
    assert s == RMStepStats(2.0, 0.75, 1.0, -1.0)


@torch.no_grad()
def test_sft_loss_covers_response_tokens_only():
    torch.manual_seed(0)
    lm = LlamaForCausalLM(_config()).eval()
    rows = SFTSet(("a", "b"), ((5, 6, 7), (8,)), ((9, 10, 2), (11, 2)), PAD)
    nll, tokens = response_nll(lm, rows.batch([0, 1]))
    assert tokens.item() == 5
    expected = 0.0
    for p, r in zip(rows.prompt_ids, rows.response_ids):
        ids = torch.tensor([list(p) + list(r)])
        labels = ids.clone()
        labels[0, : len(p)] = -100  # HF's own masked loss on the unpadded row
        expected += lm(input_ids=ids, labels=labels).loss.item() * len(r)
    assert nll.item() == pytest.approx(expected, rel=1e-4)


def test_causal_lm_becomes_a_scalar_reward_model_on_the_same_backbone(tmp_path):
    torch.manual_seed(0)
    lm = LlamaForCausalLM(_config())
    lm.config.num_labels = 2  # HF's default for a causal LM: must become 1
    lm.save_pretrained(tmp_path / "lm")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = Tokenizer(models.WordLevel({"<pad>": 0}, "<pad>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>")
    tok.save_pretrained(tmp_path / "lm")
    assert not is_scalar_classifier(tmp_path / "lm")
    out = init_reward_model(tmp_path / "lm", tmp_path / "init", seed=0)
    assert out == tmp_path / "init" and is_scalar_classifier(out)
    rm = LlamaForSequenceClassification.from_pretrained(out)
    assert rm.config.num_labels == 1
    assert torch.equal(rm.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert init_reward_model(out, tmp_path / "again", seed=0) == out  # already scalar: reused
