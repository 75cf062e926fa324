"""`load_model` from any checkpoint: a causal LM becomes a critic or reward model with a fresh
one-label head, a one-label classifier keeps its head, and dropout is off in every role."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
)

from rayrlhf.models.forward import load_model, response_values
from rayrlhf.models.tokenizer import pad_id


def _config(**kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A causal LM (whose config, like every causal LM's, says 2 labels), a one-label reward
    model, a two-label classifier and a causal LM with attention dropout 0.3."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(_config())
    assert lm.config.num_labels == 2
    models = {
        "lm": lm,
        "rm": LlamaForSequenceClassification(_config(num_labels=1)),
        "two": LlamaForSequenceClassification(_config(num_labels=2)),
        "dropout": LlamaForCausalLM(_config(attention_dropout=0.3)),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
    return {name: str(root / name) for name in models}


@pytest.mark.parametrize("kind", ["value", "reward"])
def test_a_causal_lm_gets_a_fresh_scalar_head_on_its_backbone(checkpoints, kind, capsys):
    model = load_model(kind, checkpoints["lm"])
    assert model.config.num_labels == 1 and model.score.out_features == 1
    assert "is a LlamaForCausalLM checkpoint" in capsys.readouterr().out
    lm = LlamaForCausalLM.from_pretrained(checkpoints["lm"])
    mine, theirs = model.model.state_dict(), lm.model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)  # the backbone is the LM's


def test_a_one_label_classifier_keeps_its_head(checkpoints, capsys):
    model = load_model("reward", checkpoints["rm"])
    saved = LlamaForSequenceClassification.from_pretrained(checkpoints["rm"])
    assert torch.equal(model.score.weight, saved.score.weight)
    assert "fresh" not in capsys.readouterr().out


def test_a_two_label_classifier_is_refused(checkpoints):
    with pytest.raises(ValueError, match="num_labels=1, has 2"):
        load_model("reward", checkpoints["two"])


def test_dropout_is_off_in_config_and_modules(checkpoints):
    # HF's token-classification head falls back to Dropout(0.1) and Llama's attention reads
    # its dropout from the config: both must be 0, or train-mode values differ from eval-mode.
    raw = LlamaForTokenClassification.from_pretrained(checkpoints["dropout"], num_labels=1)
    assert raw.dropout.p == 0.1
    critic = load_model("value", checkpoints["dropout"])
    assert critic.config.attention_dropout == 0.0 and critic.config.classifier_dropout == 0.0
    drops = [m for m in critic.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.p == 0.0 for m in drops)
    policy = load_model("causal_lm", checkpoints["dropout"])
    assert policy.config.attention_dropout == 0.0
    seq = torch.tensor([[3, 4, 5, 6, 7, 8]])
    mask = torch.ones_like(seq)
    with torch.no_grad():
        train = [response_values(critic.train(), seq, mask, 3) for _ in range(2)]
        evals = response_values(critic.eval(), seq, mask, 3)
        raw_train = response_values(raw.train(), seq, mask, 3)
    assert torch.equal(train[0], evals) and torch.equal(train[1], evals)
    assert not torch.equal(raw_train, response_values(raw.eval(), seq, mask, 3))


def test_pad_id_falls_back_to_eos_then_0():
    assert pad_id(SimpleNamespace(pad_token_id=7, eos_token_id=2)) == 7
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2  # Llama-3, Mistral
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
