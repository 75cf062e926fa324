"""The memory plan: its counts against real models, its estimates against what autograd saves,
and its verdict on the GPU recipes and on broken variants of them (offline shapes only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
)

from rayrlhf.cluster.capacity import check_capacity, check_placement_main
from rayrlhf.cluster.memory import (
    GIB,
    MemoryPlanError,
    ModelDims,
    load_dims,
    plan_memory,
    saved_for_backward,
    trainer_parts,
)
from rayrlhf.cluster.placement import PlacementError
from rayrlhf.cluster.shape import ClusterShape
from rayrlhf.config import RankGroupConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ROOT / "deploy" / "cluster-shapes"
R8B, R70B = "llama3-8b-2x8xa100.yaml", "llama3-70b-9x8xa100.yaml"


def recipe(name: str, *sets: str):
    return load_config(ROOT / "configs" / name, list(sets))


def shape(name: str) -> ClusterShape:
    return ClusterShape.from_yaml(SHAPES / name)


def small_config(**kw) -> LlamaConfig:
    fields = dict(
        vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return LlamaConfig(**{**fields, **kw})


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(
    "kind,cls",
    [
        ("causal_lm", LlamaForCausalLM),
        ("value", LlamaForTokenClassification),
        ("reward", LlamaForSequenceClassification),
    ],
)
def test_parameter_count_equals_the_models(kind, cls, tied):
    config = small_config(tie_word_embeddings=tied, num_labels=1)
    with torch.device("meta"):
        model = cls(config)
    assert ModelDims.from_config(config).params(kind) == sum(p.numel() for p in model.parameters())


def test_llama3_counts_from_the_shipped_configs():
    models = shape(R8B).models
    dims, source = load_dims("/models/Meta-Llama-3-8B-Instruct", models)
    assert source == "the cluster shape"
    assert dims.params("causal_lm") == 8_030_261_248  # Meta's published count
    dims70, _ = load_dims("/models/Meta-Llama-3-70B-Instruct", shape(R70B).models)
    assert dims70.params("causal_lm") == 70_553_706_496
    assert load_dims("/nowhere", models) == (None, load_dims("/nowhere", {})[1])


def _saved_bytes(layers: int, checkpointing: bool, b: int = 2, t: int = 64) -> int:
    """Bytes autograd saves for backward in a bf16 HF Llama forward (storages, once each)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(small_config(num_hidden_layers=layers)).to(torch.bfloat16).train()
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return saved_for_backward(model, input_ids=torch.randint(0, 1000, (b, t)))


def test_activation_estimate_bounds_what_autograd_saves():
    # Per layer per token: the difference between 3 layers and 1, over 2 layers and b * t tokens.
    dims = ModelDims.from_config(small_config())
    tokens = 2 * 64
    full = (_saved_bytes(3, False) - _saved_bytes(1, False)) / 2 / tokens
    assert full <= dims.layer_activations() <= 1.3 * full  # an upper bound, not a wild one
    ckpt = (_saved_bytes(3, True) - _saved_bytes(1, True)) / 2 / tokens
    assert ckpt == 2 * dims.hidden  # checkpointing keeps each layer's bf16 input only


def test_trainer_parts_by_hand():
    dims = ModelDims.from_config(small_config())
    p = dims.params("value")
    group = RankGroupConfig(model_path="x", num_ranks=4, micro_batch_size=2)
    from rayrlhf.cluster.memory import Lengths

    parts = trainer_parts(group, "value", dims, Lengths(seq=100, response=40))
    assert parts["weights"] == 2 * p / 4 and parts["gradients"] == 4 * p / 4
    assert parts["optimizer"] == 12 * p / 4 and parts["logits"] == 0  # a value head: no vocab
    assert parts["activations"] == 200 * 2 * dims.layer_activations()
    off = group.model_copy(update={"offload_optimizer": True, "offload_params": True})
    parts = trainer_parts(off, "causal_lm", dims, Lengths(seq=100, response=40))
    assert parts["weights"] == parts["gradients"] == parts["optimizer"] == 0
    assert parts["logits"] == 200 * 4 * 1000 + 80 * 12 * 1000


@pytest.mark.parametrize("name", [R8B, R70B])
def test_gpu_recipes_fit_their_clusters_in_memory(name):
    cfg, shp = recipe(name), shape(name)
    check_capacity(cfg, shp)  # placement and memory
    from rayrlhf.cluster.capacity import gpu_capacity, plan_placement

    plan = plan_memory(cfg, shp.models, gpu_capacity(plan_placement(cfg, shp), shp))
    assert [r.role for r in plan] == ["policy", "critic", "reference", "reward", "rollout"]
    assert all(r.parts and r.capacity_gib == 80 and r.fits for r in plan), plan


def _refusal(name: str, *sets: str) -> str:
    with pytest.raises(PlacementError) as info:
        check_capacity(recipe(name, *sets), shape(name))
    return str(info.value)


def test_8b_critic_on_two_ranks_without_checkpointing_is_refused():
    msg = _refusal(R8B, "critic.gradient_checkpointing=false", "critic.offload_optimizer=false")
    assert msg.startswith("does not fit in GPU memory: critic: needs ")
    assert "activations 118.0" in msg and "its GPU has 80 GiB" in msg
    assert "set critic.gradient_checkpointing: true" in msg and "policy" not in msg
    # Checkpointing alone is not the whole story: the policy without it is refused too.
    assert "policy: needs" in _refusal(R8B, "policy.gradient_checkpointing=false")


def test_70b_reference_on_one_gpu_is_refused():
    msg = _refusal(
        R70B, "reference.resources={num_cpus: 8, num_gpus: 1, custom: {trainer_node: 0.125}}"
    )
    assert "reference: needs " in msg and "weights 131.4" in msg
    assert "give reference more GPUs to split it over" in msg


def test_tp4_in_one_4_gpu_bundle_is_refused():
    sets = "rollout.resources={num_cpus: 16, num_gpus: 4, custom: {rollout_node: 0.5}}"
    msg = _refusal(R70B, sets)
    assert msg.startswith("rollout: tensor_parallel_size 4 puts each engine in 4 bundles")
    assert "refuses a bundle of more than one" in msg and "asks for 4 GPUs" in msg


def test_engine_without_room_for_one_sequence_is_refused():
    # 70B on one GPU per engine: vLLM's share cannot even hold the weights.
    sets = ["rollout.tensor_parallel_size=1", "rollout.num_engines=8"]
    msg = _refusal(R70B, *sets)
    assert "rollout: needs" in msg and "KV cache" in msg and "one sequence of 2048 tokens" in msg


JUDGE_8B = (  # an 8B judge on one GPU of the rollout node, in place of an engine
    "reward.judge={model_path: /models/Meta-Llama-3-8B-Instruct, kv_cache_gib: null, "
    "gpu_memory_utilization: %s, resources: {num_cpus: 8, num_gpus: 1, "
    "custom: {rollout_node: 0.125}}}"
)


def test_a_judge_that_fits_is_planned_and_passes():
    from rayrlhf.cluster.capacity import gpu_capacity, plan_placement

    cfg, shp = recipe(R8B, "rollout.num_engines=7", JUDGE_8B % 0.85), shape(R8B)
    check_capacity(cfg, shp)
    plan = plan_memory(cfg, shp.models, gpu_capacity(plan_placement(cfg, shp), shp))
    assert [r.role for r in plan] == ["policy", "critic", "reference", "judge", "reward", "rollout"]
    (judge,) = [r for r in plan if r.role == "judge"]
    assert judge.fits and judge.capacity_gib == 80 and judge.parts["sync"] == 0  # no syncs
    assert judge.parts["weights"] / GIB == pytest.approx(2 * 8_030_261_248 / GIB)
    assert judge.total_gib == pytest.approx(0.85 * 80)  # vLLM's share: the KV cache the rest


def test_a_judge_that_cannot_fit_is_refused_naming_the_judge():
    # 0.2 x 80 GiB cannot even hold the judge's 15 GiB of weights and its activation peak.
    msg = _refusal(R8B, "rollout.num_engines=7", JUDGE_8B % 0.2)
    assert msg.startswith("does not fit in GPU memory: judge: needs ") and "KV cache" in msg
    assert "one sequence of 2112 tokens" in msg  # 1024 + 1024 + the verdict's 64
    assert "reward.judge.gpu_memory_utilization" in msg and "rollout" not in msg
    big = JUDGE_8B.replace("kv_cache_gib: null", "kv_cache_gib: 70") % 0.85
    msg = _refusal(R8B, "rollout.num_engines=7", big)
    assert "judge: needs " in msg and "kv_cache 70.0" in msg and "its GPU has 80 GiB" in msg


def test_tp_engines_pack_one_node_each():
    from rayrlhf.cluster.capacity import plan_placement

    (rollout,) = [p for p in plan_placement(recipe(R70B), shape(R70B)) if p.role == "rollout"]
    assert len(rollout.nodes) == 32
    engines = [set(rollout.nodes[i : i + 4]) for i in range(0, 32, 4)]
    assert all(len(e) == 1 for e in engines)  # each engine's 4 bundles on one node
    # 9 engines of 4 GPUs need 4.5 rollout nodes: the ninth finds no node with 4 GPUs free.
    msg = _refusal(R70B, "rollout.num_engines=9")
    assert msg.startswith("rollout: needs 4 x") and "engine 8 of 9 finds none" in msg


def test_cli_prints_the_memory_plan_and_refuses_with_exit_2(capsys):
    args = ["--config", str(ROOT / "configs" / R8B)]
    assert check_placement_main(str(ROOT / "configs" / R8B), [], str(SHAPES / R8B)) == 0
    out = capsys.readouterr().out
    assert "memory per GPU (estimate / GPU memory, GiB):" in out and "policy" in out
    bad = ["critic.gradient_checkpointing=false", "critic.offload_optimizer=false"]
    assert check_placement_main(args[1], bad, str(SHAPES / R8B)) == 2
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out and "critic: needs" in captured.err


def test_unknown_model_and_unknown_gpu_memory_are_not_refused(tmp_path):
    cfg = recipe(R8B)
    plan = plan_memory(cfg, {}, lambda role: None)  # no configs, no GPU memory
    assert all(not r.parts and "not estimated" in r.note for r in plan)
    small = tmp_path / "m"
    small_config().save_pretrained(small)  # a config.json on this machine wins over the shape
    dims, source = load_dims(str(small), {})
    assert source == "its config.json" and dims.hidden == 256
    assert AutoConfig.from_pretrained(small).hidden_size == 256
    plan = plan_memory(cfg, shape(R8B).models, lambda role: None)
    assert all(r.fits for r in plan) and plan[0].total_gib > 0
    assert plan[0].parts["weights"] / GIB == pytest.approx(2 * 8_030_261_248 / 4 / GIB)


def test_memory_plan_error_is_a_placement_error():
    assert issubclass(MemoryPlanError, PlacementError)
