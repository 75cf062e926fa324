"""benchmarks/step_model.py: its parameter and byte counts are Llama-3-8B's, and its phases add
up as its docstring says."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from step_model import Shape, main  # noqa: E402


def test_the_shape_counts_llama3_8b_as_transformers_builds_it():
    shape = Shape()
    config = LlamaConfig(
        hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        intermediate_size=shape.intermediate, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == shape.total_params() == 8_030_261_248
    assert shape.kv_bytes_per_token() == 131072  # 32 layers x 8 KV heads x 128 x (K, V) x 2 B


def test_the_step_adds_up(capsys):
    sync = main([])
    p, steps = sync["phase_seconds"], sync["step_seconds"]
    assert steps["synchronous"] == sum(p.values())
    assert steps["overlapped"] == max(p["generate"], p["score"] + p["train"]) + p["sync"]
    assert p["score"] == max(sync["score_role_seconds"].values())
    rebalanced = main(["--rebalanced"])
    assert rebalanced["gpus"] == sync["gpus"] == 16 and rebalanced["critic_ranks"] == 4
    assert rebalanced["step_seconds"]["synchronous"] < steps["synchronous"]
    capsys.readouterr()
