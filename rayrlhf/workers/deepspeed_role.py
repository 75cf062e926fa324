"""What the ZeRO-3 roles (policy, critic) share: process group, sharded load, engine, saving.

Each rank is one Ray actor. The model is built inside `HfDeepSpeedConfig`'s zero.Init, so no rank
ever holds the full parameters; gathering happens a bucket at a time when weights leave the group
(`weight_sync.zero3`).
"""

from __future__ import annotations

import math
import os
import pickle
import random
import warnings
from dataclasses import dataclass
from functools import partial

import torch

from rayrlhf.cluster.placement import RankSpec
from rayrlhf.cluster.rendezvous import init_default_group
from rayrlhf.config import RankGroupConfig
from rayrlhf.weight_sync import zero3
from rayrlhf.weight_sync.records import plan_buckets


def persistence_threshold(model_path: str) -> int:
    """Parameters of at most this many elements stay whole on every rank: 10 x hidden size, the
    rule of HF's "auto" setting. The norm weights (hidden-size vectors) then need no all-gather
    each forward, and every matrix is still partitioned."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    return 10 * config.get_text_config().hidden_size


def zero_optimization(group: RankGroupConfig, use_cuda: bool) -> dict:
    """The `zero_optimization` section: ZeRO-3, its persistence threshold, and the group's
    offload choices (pinned host buffers on GPU nodes, for faster copies)."""
    out = {
        "stage": 3,
        "stage3_param_persistence_threshold": persistence_threshold(group.model_path),
    }
    if group.offload_optimizer:
        out["offload_optimizer"] = {"device": "cpu", "pin_memory": use_cuda}
    if group.offload_params:
        out["offload_param"] = {"device": "cpu", "pin_memory": use_cuda}
    return out


def deepspeed_config(spec: RankSpec, use_cuda: bool) -> dict:
    """ZeRO-3 config: AdamW (torch implementation on CPU), bf16 on GPU, fp32 on CPU."""
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum_steps,
        "gradient_clipping": spec.group.grad_clip,
        "zero_optimization": zero_optimization(spec.group, use_cuda),
        # Sum micro-batch gradients in fp32: in bf16 (DeepSpeed's default, the model's dtype)
        # 8-12 summed micro-batches lose the small gradients' low bits.
        "data_types": {"grad_accum_dtype": "fp32"},
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


def lr_multiplier(step: int, group: RankGroupConfig) -> float:
    """The factor on `group.lr` at optimizer step `step` (from 0): a linear warm-up over
    lr_warmup_steps, then `lr_schedule`, from 1 down to lr_min_ratio at step lr_total_steps."""
    warmup = group.lr_warmup_steps
    if step < warmup:
        return (step + 1) / warmup  # the first step already moves the weights
    if group.lr_schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(group.lr_total_steps - warmup, 1), 1.0)
    low = group.lr_min_ratio
    if group.lr_schedule == "linear":
        return 1.0 - (1.0 - low) * progress
    return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler(group: RankGroupConfig):
    """What `deepspeed.initialize(lr_scheduler=...)` takes: a callable that builds the schedule
    on DeepSpeed's optimizer, which DeepSpeed then steps at every optimizer step. DeepSpeed's own
    WarmupLR family cannot express this: it forces at least 2 warm-up steps and begins the
    warm-up at lr 0."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_multiplier, group=group)
    )


class UnsafePickleError(pickle.UnpicklingError):
    """A checkpoint file whose pickle would build something other than tensors and plain state."""


def safe_torch_load(path: str, map_location=None, mmap: bool = False):
    """`torch.load(weights_only=True)`, with DeepSpeed's two state records allowed (an enum and
    the loss scaler's plain attributes). A pickle that would import anything else, and so could
    run code, raises UnsafePickleError naming the file and the global."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # torch's message: boilerplate, then the line that names the refused global.
        lines = [ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "global" in ln]
        why = (lines or ["an unsupported pickle"])[0].removeprefix("WeightsUnpickler error: ")
        raise UnsafePickleError(
            f"{path}: refusing to unpickle it ({why}); a checkpoint holds tensors and plain "
            "state only, so this file was not written by rayrlhf or was tampered with"
        ) from None


def rng_state() -> dict:
    """Every RNG of this process that training can draw from (torch CPU and CUDA, Python,
    NumPy), in types `safe_torch_load` reads back."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
    }


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step did (`DeepSpeedRole.backward_step`)."""

    grad_norm: float
    """Global gradient norm before clipping; NaN when skipped."""
    skipped: bool
    """The step was skipped for a non-finite loss or gradient: nothing changed."""
    streak: int
    """Steps skipped in a row up to this one (0 when it was applied)."""

    @staticmethod
    def fields(outcomes: list[StepOutcome | None]) -> dict[str, float]:
        """`TrainStats` fields of one call's optimizer steps (None: a micro-batch between
        steps): mean norm of the steps applied, steps skipped, and the longest skip streak."""
        done = [o for o in outcomes if o is not None]
        norms = [o.grad_norm for o in done if not o.skipped]
        return {
            "grad_norm": sum(norms) / len(norms) if norms else 0.0,
            "skipped": float(sum(o.skipped for o in done)),
            "skip_streak": float(max((o.streak for o in done), default=0)),
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
        from deepspeed.constants import default_pg_timeout
        from transformers.integrations import HfDeepSpeedConfig

        from rayrlhf.models.forward import load_model

        self.use_cuda = torch.cuda.is_available()
        backend = "nccl" if self.use_cuda else "gloo"
        # env:// would start a store on every interface; DeepSpeed adopts this group instead.
        # A process's second role (tests build several) reuses the group, as DeepSpeed would.
        if not torch.distributed.is_initialized():
            init_default_group(
                backend,
                spec.master_addr,
                spec.master_port,
                spec.rank,
                spec.world_size,
                default_pg_timeout,
            )
        deepspeed.init_distributed(dist_backend=backend)
        self.spec = spec
        self.ds_config = deepspeed_config(spec, self.use_cuda)
        self._hf_ds = HfDeepSpeedConfig(self.ds_config)  # must stay alive: turns on zero.Init
        dtype = torch.bfloat16 if self.use_cuda else torch.float32
        model = load_model(self.MODEL_KIND, model_path, dtype)
        model.config.use_cache = False
        if spec.group.gradient_checkpointing:  # non-reentrant: works with ZeRO-3's hooks
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.engine, *_ = deepspeed.initialize(
            model=model,
            config=self.ds_config,
            model_parameters=model.parameters(),
            lr_scheduler=lr_scheduler(spec.group),
        )
        self.model_path = model_path
        self.skip_streak = 0
        """Optimizer steps skipped in a row, up to the last one (the same on every rank)."""

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def current_lr(self) -> float:
        """The learning rate the next optimizer step will use."""
        return float(self.engine.get_lr()[0])

    def backward_step(self, loss: torch.Tensor) -> StepOutcome | None:
        """Backward one micro-batch's loss and `engine.step()`: at the accumulation boundary
        DeepSpeed takes the optimizer step, and this returns its outcome (else None).

        A non-finite gradient skips the step on every rank alike, by DeepSpeed's own path:
        ZeRO-3 all-reduces the gradient norm over the group, finds it non-finite, zeroes the
        gradients and leaves weights and AdamW state alone; the engine then leaves the LR
        schedule unstepped and counts the step in `skipped_steps`. A non-finite loss is backed
        as NaN, so that an inf loss with a finite gradient (e.g. a k1 KL term against a -inf
        reference logprob) is skipped too, and every rank still runs the same collectives."""
        boundary = self.engine.is_gradient_accumulation_boundary()  # step() moves it on
        if not torch.isfinite(loss).all():
            loss = loss * math.nan
        skipped = self.engine.skipped_steps
        self.engine.backward(loss)
        self.engine.step()
        if not boundary:
            return None
        if self.engine.skipped_steps > skipped:
            self.skip_streak += 1
            return StepOutcome(math.nan, True, self.skip_streak)
        self.skip_streak = 0
        return StepOutcome(float(self.engine.get_global_grad_norm()), False, 0)

    def shard_numel(self) -> tuple[int, int]:
        """(parameters held by this rank, parameters in the model): ZeRO-3 gives ~1/N each."""
        params = list(self.module.parameters())
        return sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)

    def save(self, path: str, bucket_mb: float = 256.0) -> None:
        """Write an HF checkpoint (model + tokenizer) from rank 0. Collective. It is written
        to `<path>.tmp` and renamed when complete (`models.saving.atomic_dir`), so a failed
        save leaves `path` as it was, never a config.json without weights."""
        plan = plan_buckets(zero3.param_metas(self.module), int(bucket_mb * 2**20))
        state = {}
        for bucket in zero3.gathered_buckets(self.module, plan, self.spec.rank):
            state.update({n: t.detach().to("cpu", copy=True) for n, t in bucket})
        if self.spec.rank == 0:
            from transformers import AutoTokenizer

            from rayrlhf.models.saving import atomic_dir

            with atomic_dir(path) as tmp:
                self.module.save_pretrained(tmp, state_dict=state)
                AutoTokenizer.from_pretrained(self.model_path).save_pretrained(tmp)

    def save_checkpoint(self, path: str) -> None:
        """Write this rank's ZeRO-3 state (weight partitions, AdamW moments, LR schedule, step
        counters) and its RNG states under `path`, in DeepSpeed's layout. Collective."""
        self.engine.save_checkpoint(
            path, tag=CHECKPOINT_TAG, client_state={"rng": rng_state()}, save_latest=False
        )

    def load_checkpoint(self, path: str) -> None:
        """Restore what `save_checkpoint` wrote, into this freshly built engine (ZeRO-3 loads
        only into an engine that has not stepped). Every file is unpickled by `safe_torch_load`;
        the checkpoint's rank count must be this group's (the driver checks it first)."""
        self.engine.checkpoint_engine.load = safe_torch_load  # DeepSpeed's own passes False
        loaded, client = self.engine.load_checkpoint(path, tag=CHECKPOINT_TAG)
        if loaded is None:
            raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint '{CHECKPOINT_TAG}' there")
        set_rng_state(client["rng"])


CHECKPOINT_TAG = "ds"
"""DeepSpeed's tag (sub-directory) of a rank group's checkpoint."""
