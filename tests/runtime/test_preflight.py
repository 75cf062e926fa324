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


# ---- the pre-flight gaps of #19: each exits 2 before Ray starts, naming the field or file:line


def _tiny_cfg(tiny_models, *sets):
    models = [f"{r}.model_path={tiny_models[r]}" for r in ("policy", "critic", "reward")]
    return load_config(None, ["make_tiny_models=null", *models, *sets])


def _copy_without(src, dst, *names):
    """A copy of the model directory `src` without the files `names` (globs)."""
    import shutil

    shutil.copytree(src, dst)
    for pattern in names:
        for f in dst.glob(pattern):
            f.unlink()
    return dst


@pytest.mark.parametrize("role", ["critic", "reward", "reference"])
def test_a_model_directory_without_config_json_names_the_field(tiny_models, tmp_path, role):
    from rayrlhf.runtime.preflight import check_paths

    bare = _copy_without(tiny_models["policy" if role == "reference" else role],
                         tmp_path / role, "config.json")  # fmt: skip
    cfg = _tiny_cfg(tiny_models, f"{role}.model_path={bare}")
    with pytest.raises(ConfigError, match=rf"{role}\.model_path: {bare} is a directory without "):
        check_paths(cfg)


@pytest.mark.parametrize("field", ["data.prompts", "eval.prompts"])
def test_a_plain_directory_as_the_prompt_file_names_the_field(tiny_models, tmp_path, field):
    from rayrlhf.runtime.preflight import check_paths

    (tmp_path / "prompts.jsonl").mkdir()  # e.g. a mistyped path
    cfg = _tiny_cfg(tiny_models, f"{field}={tmp_path / 'prompts.jsonl'}", "eval.every_steps=2")
    with pytest.raises(ConfigError, match=rf"{field}: .*prompts.jsonl: is a directory, not a data"):
        check_paths(cfg)


def _short_context_policy(tiny_models, tmp_path, context):
    import json

    policy = _copy_without(tiny_models["policy"], tmp_path / "short")
    config = json.loads((policy / "config.json").read_text())
    config["max_position_embeddings"] = context
    (policy / "config.json").write_text(json.dumps(config))
    return policy


def _long_prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Tell me about the cat."}\n{"prompt": "%s"}\n' % ("cat " * 30))
    return path


def test_prompts_are_checked_against_the_models_context(tiny_models, tmp_path, capsys):
    from transformers import AutoTokenizer

    from rayrlhf.data.jsonl import DataError
    from rayrlhf.data.prompts import PromptSet
    from rayrlhf.runtime.preflight import context_limit

    policy = _short_context_policy(tiny_models, tmp_path, 40)
    prompts = _long_prompt_file(tmp_path)
    sets = [f"policy.model_path={policy}", f"data.prompts={prompts}", "rollout.max_new_tokens=16"]
    cfg = _tiny_cfg(tiny_models, *sets)
    assert cfg.data.max_prompt_tokens == 64  # within data's limit: only the context catches it
    limit = context_limit(cfg)
    assert limit.tokens == 40 - 16
    tok = AutoTokenizer.from_pretrained(policy)
    assert 24 < len(tok("cat " * 30)["input_ids"]) <= 64
    with pytest.raises(
        DataError,
        match=rf"{prompts}:2: prompt has \d+ tokens, more than 24: "
        r"policy.model_path's context of 40 tokens .* rollout.max_new_tokens=16",
    ):
        PromptSet.load(cfg.data, tok, 0, limit)  # fmt: skip
    drop = cfg.data.model_copy(update={"overlong": "drop"})
    assert len(PromptSet.load(drop, tok, 0, limit)) == 1
    assert "dropped 1 prompt(s)" in capsys.readouterr().out


def test_a_response_longer_than_the_context_is_a_config_error(tiny_models, tmp_path):
    from rayrlhf.runtime.preflight import context_limit

    policy = _short_context_policy(tiny_models, tmp_path, 16)
    cfg = _tiny_cfg(tiny_models, f"policy.model_path={policy}", "rollout.max_new_tokens=16")
    with pytest.raises(ConfigError, match="rollout.max_new_tokens: .* leaves no room"):
        context_limit(cfg)


def test_a_model_without_tokenizer_reads_the_policys_ids_if_its_embedding_covers_them(
    tiny_models, tmp_path, capsys
):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rayrlhf.runtime.preflight import check_tokenizers

    bare = _copy_without(tiny_models["reward"], tmp_path / "rm", "tokenizer*")
    check_tokenizers(_tiny_cfg(tiny_models, f"reward.model_path={bare}"))
    assert f"reward.model_path {bare} has no tokenizer" in capsys.readouterr().out
    small = tmp_path / "rm-small-vocab"  # trained with another, smaller vocabulary
    dims = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=0,
    )
    LlamaForSequenceClassification(LlamaConfig(**dims)).save_pretrained(small)  # fmt: skip
    with pytest.raises(
        ConfigError,
        match=rf"reward.model_path: {small} has 100 embedding rows, "
        r"fewer than the 512 tokens of the policy's tokenizer",
    ):
        check_tokenizers(_tiny_cfg(tiny_models, f"reward.model_path={small}"))  # fmt: skip


def test_only_the_reward_model_may_bring_its_own_tokenizer(tiny_models, tmp_path):
    import shutil

    from rayrlhf.models.tiny import train_tokenizer
    from rayrlhf.runtime.preflight import check_tokenizers

    for role in ("reward", "critic"):
        other = tmp_path / role
        shutil.copytree(tiny_models[role], other)
        train_tokenizer(vocab_size=300).save_pretrained(other)
    check_tokenizers(_tiny_cfg(tiny_models, f"reward.model_path={tmp_path / 'reward'}"))
    with pytest.raises(ConfigError, match="critic.model_path: its tokenizer does not match"):
        check_tokenizers(_tiny_cfg(tiny_models, f"critic.model_path={tmp_path / 'critic'}"))
