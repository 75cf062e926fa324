"""What the ZeRO-3 roles (policy, critic) share: process group, sharded load, engine, gathering.

Each rank is one Ray actor. The model is built inside `HfDeepSpeedConfig`'s zero.Init, so no rank
ever holds the full parameters; gathering happens a bucket at a time when weights leave the group.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from rayrlhf.cluster.placement import RankSpec
from rayrlhf.weight_sync.records import ParamMeta, piece_bounds, plan_buckets


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
        self._plans: dict[int, list[list[ParamMeta]]] = {}

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def shard_numel(self) -> tuple[int, int]:
        """(parameters held by this rank, parameters in the model): ZeRO-3 gives ~1/N each."""
        params = list(self.module.parameters())
        return sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)

    def param_metas(self) -> list[ParamMeta]:
        """Full (unsharded) name, shape and dtype of every parameter, in sync order."""
        return [ParamMeta(n, tuple(p.ds_shape), p.dtype) for n, p in self.module.named_parameters()]

    def bucket_plan(self, bucket_bytes: int) -> list[list[ParamMeta]]:
        """The parameters in buckets of about `bucket_bytes` (the same on every rank)."""
        if bucket_bytes not in self._plans:
            self._plans[bucket_bytes] = plan_buckets(self.param_metas(), bucket_bytes)
        return self._plans[bucket_bytes]

    @contextmanager
    def gathered(self, metas: list[ParamMeta]) -> Iterator[list[tuple[str, Tensor]]]:
        """The full parameters of `metas` while the context lasts. Collective.

        Rank 0 gets (name, tensor) views of DeepSpeed's gathered buffers, valid only inside the
        context (copy what must outlive it); other ranks get an empty list.
        """
        import deepspeed

        named = dict(self.module.named_parameters())
        params = [named[m.name] for m in metas]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield [(m.name, p.data) for m, p in zip(metas, params)] if self.spec.rank == 0 else []

    def local_pieces(self, metas: list[ParamMeta]) -> list[tuple[str, Tensor]]:
        """This rank's ZeRO-3 partition of each parameter in `metas`, padding cut off: piece
        `rank` of `piece_bounds(numel, world_size)`, a view, no collective."""
        named = dict(self.module.named_parameters())
        rank, world = self.spec.rank, self.spec.world_size
        out = []
        for m in metas:
            lo, hi = piece_bounds(m.numel, world)[rank]
            part = named[m.name].ds_tensor.detach()
            if part.numel() != -(-m.numel // world):  # e.g. hpZ or MiCS partitioning
                raise RuntimeError(
                    f"{m.name}: rank {rank} holds {part.numel()} of {m.numel} elements, not the "
                    f"ZeRO-3 layout of {world} equal pieces that weight sync reads"
                )
            out.append((m.name, part[: hi - lo]))
        return out

    def gathered_buckets(self, bucket_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
        """Yield full parameters a bucket at a time (see `gathered`: each bucket's tensors are
        valid until the next one is requested). Collective: every rank must iterate."""
        for metas in self.bucket_plan(bucket_bytes):
            with self.gathered(metas) as bucket:
                yield bucket

    def save(self, path: str, bucket_mb: float = 256.0) -> None:
        """Write an HF checkpoint (model + tokenizer) from rank 0. Collective."""
        state = {}
        for bucket in self.gathered_buckets(int(bucket_mb * 2**20)):
            state.update({n: t.detach().to("cpu", copy=True) for n, t in bucket})
        if self.spec.rank == 0:
            from transformers import AutoTokenizer

            self.module.save_pretrained(path, state_dict=state)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(path)
