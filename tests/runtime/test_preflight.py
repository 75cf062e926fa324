"""The pre-flight's placement and memory checks, which run on the driver before Ray starts."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from rayrlhf.config import ConfigError, load_config
from rayrlhf.runtime.preflight import check_layout_and_memory


def test_tp_engine_in_a_multi_gpu_bundle_fails_before_ray_starts():
    cfg = load_config(None, ["rollout.tensor_parallel_size=2", "rollout.resources.num_gpus=2"])
    with pytest.raises(ConfigError, match="rollout: tensor_parallel_size 2"):
        check_layout_and_memory(cfg)


def test_roles_on_this_machines_gpus_are_planned(tmp_path):
    # A config.json of Llama-3-8B's shape is all the plan reads of a model.
    dims = dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    )  # fmt: skip
    LlamaConfig(**dims).save_pretrained(tmp_path / "m8b")
    path = str(tmp_path / "m8b")
    gpu = ["resources.num_gpus=1"]
    sets = [f"{r}.model_path={path}" for r in ("policy", "critic", "reward")]
    sets += [
        f"{r}.{g}" for r in ("policy", "critic", "reference", "reward", "rollout") for g in gpu
    ]
    sets += [
        "data.max_prompt_tokens=1024",
        "rollout.max_new_tokens=1024",
        "rollout.kv_cache_gib=null",
    ]
    cfg = load_config(None, sets)
    with pytest.raises(ConfigError, match="policy: needs .* but its GPU has 80 GiB"):
        check_layout_and_memory(cfg, gpu_gib=80.0)
    check_layout_and_memory(cfg, gpu_gib=None)  # a cluster's GPUs: check-placement's job
    fixes = [
        "policy.gradient_checkpointing=true",
        "policy.offload_optimizer=true",
        "policy.micro_batch_size=2",
        "critic.gradient_checkpointing=true",
        "critic.offload_optimizer=true",
        "reward.micro_batch_size=4",
        "reference.micro_batch_size=4",
    ]
    roomy = load_config(None, [*sets, *fixes])
    check_layout_and_memory(roomy, gpu_gib=80.0)
