"""Single-GPU checks of the GPU code paths: what torch, transformers and DeepSpeed can show on one
GPU. Marked `gpu` and skipped without CUDA; `scripts/gpu-check.sh` runs them. A check whose
library is missing on the GPU machine (DeepSpeed, say) is skipped, naming it."""

from __future__ import annotations

import datetime
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def small_llama(layers: int = 4, hidden: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=4096, hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
    )  # fmt: skip


def test_activation_estimate_bounds_cuda_sdpa():
    """The memory plan's per-layer activations against what bf16 SDPA on CUDA saves."""
    from transformers import LlamaForCausalLM

    from rayrlhf.cluster.memory import ModelDims, saved_for_backward

    ids = torch.randint(0, 4096, (2, 256), device="cuda")
    saved = []
    for layers in (1, 3):
        model = LlamaForCausalLM(small_llama(layers)).cuda().bfloat16().train()
        model.config.use_cache = False
        saved.append(saved_for_backward(model, input_ids=ids))
    per_token_layer = (saved[1] - saved[0]) / 2 / ids.numel()
    estimate = ModelDims.from_config(small_llama()).layer_activations()
    print(f"saved {per_token_layer:.0f} B/token/layer, estimate {estimate}")
    assert per_token_layer <= estimate <= 1.5 * per_token_layer


def test_fingerprint_of_device_tensors_equals_the_hosts():
    from rayrlhf.weight_sync.records import Fingerprint

    g = torch.Generator().manual_seed(0)
    tensors = [("w", torch.randn(64, 32, generator=g).bfloat16()), ("b", torch.randn(7))]
    for hashed in (True, False):
        host, device = Fingerprint(hash_bytes=hashed), Fingerprint(hash_bytes=hashed)
        for name, t in tensors:
            host.update(name, t, parts=3)
            device.update(name, t.cuda(), parts=3)
        assert host.hexdigest() == device.hexdigest()


def test_nccl_broadcast_of_a_bucket_on_device_with_its_time_out():
    """The broadcast sender's path on one GPU: a one-member NCCL group (the time-out set through
    ProcessGroupNCCL.Options, which CPU torch lacks), flat buckets on device, the digest."""
    from rayrlhf.cluster.rendezvous import free_port
    from rayrlhf.weight_sync.broadcast import (
        group_device,
        nccl_options,
        new_group,
        send_broadcast,
    )
    from rayrlhf.weight_sync.records import Fingerprint

    opts = nccl_options(datetime.timedelta(seconds=42))
    assert opts._timeout == datetime.timedelta(seconds=42)
    group = new_group("nccl", "127.0.0.1", free_port(), 0, 1, timeout_s=60)
    device = group_device("nccl")
    bucket = [("a", torch.randn(4, 4, device=device)), ("b", torch.randn(3, device=device))]
    fp, n = send_broadcast(group, [bucket], device, hash_bytes=True)
    expected = Fingerprint()
    for name, t in bucket:
        expected.update(name, t.cpu())
    assert n == 1 and fp.hexdigest() == expected.hexdigest()


def test_zero3_bf16_step_with_checkpointing_and_fp32_accumulation(tmp_path):
    """One DeepSpeed rank, the role's own config: bf16 weights, fp32 gradient accumulation over
    two micro-batches, non-reentrant checkpointing, and a step that moves the weights."""
    pytest.importorskip("deepspeed")
    from transformers import LlamaForCausalLM

    from rayrlhf.cluster.placement import RankSpec
    from rayrlhf.cluster.rendezvous import free_port
    from rayrlhf.config import RankGroupConfig
    from rayrlhf.workers.deepspeed_role import DeepSpeedRole

    LlamaForCausalLM(small_llama()).save_pretrained(tmp_path / "m")
    group = RankGroupConfig(
        model_path=str(tmp_path / "m"), micro_batch_size=2, gradient_checkpointing=True
    )
    spec = RankSpec(0, 1, "127.0.0.1", free_port(), 2, 0, 4, group)
    role = DeepSpeedRole(str(tmp_path / "m"), spec)
    engine = role.engine
    assert {p.dtype for p in role.module.parameters()} == {torch.bfloat16}
    assert role.module.is_gradient_checkpointing
    assert engine.optimizer.gradient_accumulation_dtype == torch.float32
    before = [p.ds_tensor.detach().clone() for p in role.module.parameters()]
    ids = torch.randint(0, 4096, (2, 128), device="cuda")
    for _ in range(2):  # one optimizer step of two micro-batches
        loss = engine(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        engine.backward(loss)
        engine.step()
    after = [p.ds_tensor for p in role.module.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    os.environ.pop("MASTER_PORT", None)


def test_frozen_model_split_over_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from transformers import LlamaForCausalLM

    from rayrlhf.models.forward import response_logprobs
    from rayrlhf.models.frozen import load_frozen

    LlamaForCausalLM(small_llama(6)).save_pretrained(tmp_path / "m")
    split = load_frozen("causal_lm", str(tmp_path / "m"))
    assert len({p.device for p in split.parameters()}) == torch.cuda.device_count()
    whole = LlamaForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).cuda()
    seq = torch.randint(0, 4096, (2, 32))
    with torch.no_grad():
        a, _ = response_logprobs(split, seq, torch.ones_like(seq), 8)
        b, _ = response_logprobs(whole, seq, torch.ones_like(seq), 8)
    torch.testing.assert_close(a.cpu(), b.cpu(), atol=0.05, rtol=0)
