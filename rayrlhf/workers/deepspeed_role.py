"""What the ZeRO-3 roles (policy, critic) share: process group, sharded load, engine, saving.

Each rank is one Ray actor. The model is built inside `HfDeepSpeedConfig`'s zero.Init, so no rank
ever holds the full parameters; gathering happens a bucket at a time when weights leave the group
(`weight_sync.zero3`).
"""

from __future__ import annotations

import os
import warnings

import torch

from rayrlhf.cluster.placement import RankSpec
from rayrlhf.weight_sync import zero3
from rayrlhf.weight_sync.records import plan_buckets


def deepspeed_config(spec: RankSpec, use_cuda: bool) -> dict:
    """ZeRO-3 config: AdamW (torch implementation on CPU), bf16 on GPU, fp32 on CPU."""
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum_steps,
        "gradient_clipping": spec.group.grad_clip,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": spec.group.lr,
                "weight_decay": spec.group.weight_decay,
                "torch_adam": not use_cuda,
            },
        },
        "bf16": {"enabled": use_cuda},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedRole:
    """Base of a ZeRO-3 rank actor. Subclasses set `MODEL_KIND` and add their maths."""

    MODEL_KIND = "causal_lm"

    def __init__(self, model_path: str, spec: RankSpec) -> None:
        os.environ.update(
            MASTER_ADDR=spec.master_addr,
            MASTER_PORT=str(spec.master_port),
            RANK=str(spec.rank),
            WORLD_SIZE=str(spec.world_size),
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
        )
        torch.set_num_threads(spec.num_threads)
        # DeepSpeed 0.19 calls torch.distributed APIs that warn on every gather.
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.manual_seed(spec.seed)
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        from rayrlhf.models.forward import load_model

        self.use_cuda = torch.cuda.is_available()
        deepspeed.init_distributed(dist_backend="nccl" if self.use_cuda else "gloo")
        self.spec = spec
        self.ds_config = deepspeed_config(spec, self.use_cuda)
        self._hf_ds = HfDeepSpeedConfig(self.ds_config)  # must stay alive: turns on zero.Init
        dtype = torch.bfloat16 if self.use_cuda else torch.float32
        model = load_model(self.MODEL_KIND, model_path, dtype)
        model.config.use_cache = False
        self.engine, *_ = deepspeed.initialize(
            model=model, config=self.ds_config, model_parameters=model.parameters()
        )
        self.model_path = model_path

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def shard_numel(self) -> tuple[int, int]:
        """(parameters held by this rank, parameters in the model): ZeRO-3 gives ~1/N each."""
        params = list(self.module.parameters())
        return sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)

    def save(self, path: str, bucket_mb: float = 256.0) -> None:
        """Write an HF checkpoint (model + tokenizer) from rank 0. Collective."""
        plan = plan_buckets(zero3.param_metas(self.module), int(bucket_mb * 2**20))
        state = {}
        for bucket in zero3.gathered_buckets(self.module, plan, self.spec.rank):
            state.update({n: t.detach().to("cpu", copy=True) for n, t in bucket})
        if self.spec.rank == 0:
            from transformers import AutoTokenizer

            self.module.save_pretrained(path, state_dict=state)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(path)
