"""`init_reward_model` keeps the checkpoint's dtype: it runs on the driver, a CPU-only head."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from rayrlhf.recipes.rm import init_reward_model


def test_reward_model_is_built_in_the_checkpoints_dtype(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "lm")
    vocab = Tokenizer(models.WordLevel({"<pad>": 0}, "<pad>"))
    PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>").save_pretrained(
        tmp_path / "lm"
    )
    out = init_reward_model(tmp_path / "lm", tmp_path / "init", seed=0)
    # fp32 here doubled a bf16 checkpoint on the head: 32 GB for Llama-3-8B.
    rm = LlamaForSequenceClassification.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in rm.parameters()} == {torch.bfloat16}
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    params = sum(p.numel() for p in rm.parameters())
    assert size < 3 * params  # two bytes a parameter on disk, plus the header
