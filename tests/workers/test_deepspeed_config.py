"""The DeepSpeed config of every ZeRO-3 rank, as DeepSpeed itself parses it (no process group)."""

from __future__ import annotations

import pytest
from deepspeed.runtime.config import DeepSpeedConfig
from transformers import LlamaConfig

from rayrlhf.cluster.placement import RankSpec
from rayrlhf.config import RankGroupConfig
from rayrlhf.workers.deepspeed_role import deepspeed_config


@pytest.fixture()
def model_dir(tmp_path):
    """A config.json is all the DeepSpeed config reads of the model."""
    LlamaConfig(hidden_size=96, num_attention_heads=3, num_hidden_layers=2).save_pretrained(
        tmp_path
    )
    return str(tmp_path)


def spec_for(model_dir: str, **fields) -> RankSpec:
    group = RankGroupConfig(model_path=model_dir, micro_batch_size=2, **fields)
    return RankSpec(0, 4, "127.0.0.1", 1, 3, 0, 1, group)


@pytest.mark.parametrize("use_cuda", [False, True])
def test_gradients_accumulate_in_fp32(model_dir, use_cuda):
    # Without data_types DeepSpeed accumulates in the model's dtype: bf16 on GPU.
    parsed = DeepSpeedConfig(deepspeed_config(spec_for(model_dir), use_cuda))
    assert parsed.grad_accum_dtype == "fp32"
    assert parsed.bfloat16_config.enabled == use_cuda
    assert parsed.gradient_accumulation_steps == 3


def test_norm_weights_persist_and_matrices_are_partitioned(model_dir):
    # Threshold 0 all-gathered every norm weight on every forward; 10 x hidden keeps those
    # vectors (96 elements) whole and still partitions the smallest matrix (96 x 32).
    parsed = DeepSpeedConfig(deepspeed_config(spec_for(model_dir), use_cuda=True))
    threshold = parsed.zero_config.param_persistence_threshold
    assert threshold == 960
    assert 96 <= threshold < 96 * 32


def test_offload_options_reach_deepspeed(model_dir):
    plain = DeepSpeedConfig(deepspeed_config(spec_for(model_dir), use_cuda=True)).zero_config
    assert plain.offload_optimizer is None and plain.offload_param is None
    both = spec_for(model_dir, offload_optimizer=True, offload_params=True)
    zero = DeepSpeedConfig(deepspeed_config(both, use_cuda=True)).zero_config
    assert zero.offload_optimizer.device == "cpu" and zero.offload_optimizer.pin_memory
    assert zero.offload_param.device == "cpu"
    cpu_only = DeepSpeedConfig(deepspeed_config(both, use_cuda=False)).zero_config
    assert not cpu_only.offload_optimizer.pin_memory  # nothing to pin for without a GPU
