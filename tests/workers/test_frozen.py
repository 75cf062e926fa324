"""Frozen models split over several GPUs: the device map (pure), and the map applied on CPU."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rayrlhf.models.forward import response_logprobs, sequence_scores
from rayrlhf.models.frozen import load_frozen, split_layers


def config(layers: int = 8) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0,
    )  # fmt: skip


def skeleton(cls=LlamaForCausalLM, layers: int = 8):
    with init_empty_weights():
        return cls(config(layers))


@pytest.mark.parametrize("gpus", [2, 3, 4])
@pytest.mark.parametrize("cls", [LlamaForCausalLM, LlamaForSequenceClassification])
def test_split_puts_ends_on_gpu_0_and_layers_in_runs(cls, gpus):
    model = skeleton(cls, layers=10)
    device_map = split_layers(model, gpus)
    head = "lm_head" if cls is LlamaForCausalLM else "score"
    for name in ("model.embed_tokens", "model.norm", "model.rotary_emb", head):
        assert device_map[name] == 0, name  # outputs come back where the inputs went
    layers = [device_map[f"model.layers.{i}"] for i in range(10)]
    assert layers == sorted(layers) and set(layers) == set(range(gpus))  # runs, every GPU used
    # Every parameter is covered by exactly one entry.
    for name, _ in model.named_parameters():
        owners = [k for k in device_map if name == k or name.startswith(k + ".")]
        assert len(owners) == 1, (name, owners)


def test_gpu_0_takes_fewer_layers_for_the_embeddings_and_head():
    # Embeddings and head (2 x 512 x 64) weigh about 1.2 layers here.
    layers = [v for k, v in split_layers(skeleton(layers=8), 2).items() if ".layers." in k]
    assert layers.count(0) < layers.count(1)


def test_split_refuses_a_model_without_a_layer_list():
    with pytest.raises(ValueError, match="no decoder layer list"):
        split_layers(torch.nn.Linear(2, 2), 2)


def test_the_split_map_loads_and_computes_the_same(tmp_path):
    # No GPUs here: the same map with every device the CPU checks its names against a real
    # checkpoint, and that forward.py's maths reads a dispatched model unchanged.
    torch.manual_seed(0)
    LlamaForCausalLM(config()).save_pretrained(tmp_path / "lm")
    whole = load_frozen("causal_lm", str(tmp_path / "lm"))  # no GPU: fp32 on the CPU
    device_map = {k: "cpu" for k in split_layers(skeleton(), 3)}
    split = LlamaForCausalLM.from_pretrained(tmp_path / "lm", device_map=device_map).eval()
    seq = torch.randint(1, 512, (2, 12))
    mask = torch.ones_like(seq)
    with torch.no_grad():
        a, _ = response_logprobs(whole, seq, mask, 5)
        b, _ = response_logprobs(split, seq, mask, 5)
    torch.testing.assert_close(a, b)
    assert not any(p.requires_grad for p in whole.parameters())


def test_frozen_reward_model_scores_on_cpu(tmp_path):
    torch.manual_seed(0)
    LlamaForSequenceClassification(config(2)).save_pretrained(tmp_path / "rm")
    rm = load_frozen("reward", str(tmp_path / "rm"))
    seq = torch.randint(1, 512, (3, 7))
    with torch.no_grad():
        assert sequence_scores(rm, seq, torch.ones_like(seq)).shape == (3,)
