from typing import get_args

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from rayrlhf.cli import build_parser
from rayrlhf.config import RunConfig
from rayrlhf.data.demo_task import GOOD_WORDS
from rayrlhf.models.forward import sequence_scores
from rayrlhf.models.tiny import SIZES, tiny_config


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["policy"])


def test_layout(tiny_models):
    assert set(tiny_models) == {"policy", "critic", "reward"}
    for role, path in tiny_models.items():
        assert (path / "config.json").exists(), role
        assert (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists(), role


@pytest.mark.parametrize(
    "role, auto, arch",
    [
        ("policy", AutoModelForCausalLM, "LlamaForCausalLM"),
        ("critic", AutoModelForTokenClassification, "LlamaForTokenClassification"),
        ("reward", AutoModelForSequenceClassification, "LlamaForSequenceClassification"),
    ],
)
def test_models_load_with_from_pretrained(tiny_models, role, auto, arch):
    model = auto.from_pretrained(tiny_models[role])
    assert type(model).__name__ == arch
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert cfg.hidden_size % cfg.num_attention_heads == 0
    assert head_dim >= 32
    assert getattr(cfg, "head_dim", head_dim) == head_dim
    assert next(model.parameters()).dtype == torch.float32
    if role != "policy":
        assert cfg.num_labels == 1
    out = model(input_ids=torch.tensor([[5, 6, 7]]))
    assert torch.isfinite(out.logits).all()


def test_critic_shares_the_policy_backbone(tiny_models):
    policy = AutoModelForCausalLM.from_pretrained(tiny_models["policy"])
    critic = AutoModelForTokenClassification.from_pretrained(tiny_models["critic"])
    p, c = policy.model.state_dict(), critic.model.state_dict()
    assert p.keys() == c.keys()
    assert all(torch.equal(p[k], c[k]) for k in p)


def test_tokenizer_round_trip_and_special_ids(tokenizer, tiny_models):
    text = "Tell me about the cat."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # the model configs agree with the tokenizer
    cfg = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).config
    assert cfg.vocab_size == len(tokenizer)
    assert cfg.pad_token_id == tokenizer.pad_token_id
    assert cfg.eos_token_id == tokenizer.eos_token_id


def test_all_roles_share_one_vocabulary(tiny_models):
    vocabs = [AutoTokenizer.from_pretrained(p).get_vocab() for p in tiny_models.values()]
    assert vocabs[0] == vocabs[1] == vocabs[2]


def _score(model, tokenizer, texts):
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    seq = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        seq[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    with torch.no_grad():
        return sequence_scores(model, seq, mask)


def test_reward_model_prefers_good_words(tiny_models, tokenizer):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"]).eval()
    good = sorted(GOOD_WORDS)
    other = [
        "the",
        "city",
        "rain",
        "book",
        "table",
        "dinner",
        "school",
        "morning",
        "music",
        "park",
        "sea",
        "dog",
        "trip",
        "weather",
        "garden",
        "friend",
    ]
    assert not set(other) & GOOD_WORDS
    good_texts = [" " + " ".join(good[i : i + 4]) for i in range(0, 16, 4)]
    other_texts = [" " + " ".join(other[i : i + 4]) for i in range(0, 16, 4)]
    g = _score(model, tokenizer, good_texts)
    o = _score(model, tokenizer, other_texts)
    # the rule gives 1.0 vs 0.0; the fitted model must order every pair the same way
    assert g.min() > o.max(), (g, o)
    assert (g.mean() - o.mean()).item() > 0.3


@pytest.mark.parametrize("size", sorted(SIZES))
def test_sizes_build_the_advertised_models(size, tokenizer):
    config = tiny_config(tokenizer, size)
    with torch.device("meta"):  # shapes only: no memory for the ~100M sizes
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    if size.startswith("100m"):
        assert 80e6 < params < 140e6, params
    assert config.hidden_size // config.num_attention_heads in (32, 64)  # vLLM CPU kernels
    make_tiny_choices = build_parser()._subparsers._group_actions[0].choices["make-tiny"]
    size_arg = next(a for a in make_tiny_choices._actions if a.dest == "size")
    assert size in size_arg.choices
    assert size in get_args(RunConfig.model_fields["make_tiny_size"].annotation)  # recipes too
