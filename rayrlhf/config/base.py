"""Config bases: `Section` (frozen, unknown keys refused, field docstrings as documentation),
resources, the ZeRO-3 rank group, and what every command's run has (`RunConfig`,
`RayRunConfig`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Resources(Section):
    num_cpus: float = Field(1.0, gt=0)
    """Logical CPUs reserved per actor of this role (its placement-group bundle)."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs reserved per actor of this role; 0 on a CPU-only machine."""
    custom: dict[str, float] = {}
    """Extra Ray custom resources per actor, e.g. {"rollout_node": 1} to pin a node type."""
    num_threads: int | None = Field(None, ge=1)
    """torch threads of each actor of this role (None: one per reserved CPU). On a CPU machine
    the roles mostly take turns (generate, score, train), so a role alone in its phase, the
    policy in a critic-free update say, may be given every core. Not for vLLM engines: vLLM
    binds its own threads (VLLM_CPU_OMP_THREADS_BIND)."""


class RankGroupConfig(Section):
    """A DeepSpeed ZeRO-3 trainer group: its model, its ranks and how they step."""

    model_path: str
    """HF directory of the model the group trains."""
    num_ranks: int = Field(1, ge=1)
    """DeepSpeed ZeRO-3 data-parallel ranks, one Ray actor each."""
    micro_batch_size: int = Field(4, ge=1)
    """Examples per rank per forward/backward pass (sequences; pairs for DPO and the RM)."""
    lr: float = Field(1e-4, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Global gradient-norm clip."""
    resources: Resources = Resources()
    """Resources of each rank's actor."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (non-reentrant
    checkpointing): activation memory falls from every layer's to each layer's input plus one
    layer's, for about a third more compute. The GPU recipes need it at their lengths."""
    offload_optimizer: bool = False
    """Keep the fp32 master weights, fp32 gradients and Adam states (16 bytes a parameter, over
    the ranks) in host memory and step on the CPU (DeepSpeed ZeRO-Offload): frees most of a
    rank's GPU memory for a slower optimizer step."""
    offload_params: bool = False
    """Also keep the bf16 parameter partitions in host memory between uses (ZeRO-Infinity, to
    CPU): for weights that do not fit even sharded; every forward then reads them over PCIe."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning rate after the warm-up: 'constant' stays at lr; 'linear' and 'cosine' decay it
    to lr_min_ratio x lr at optimizer step lr_total_steps (and hold it there)."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warm-up: step k of them (from 1) uses lr x k / lr_warmup_steps;
    0 starts at lr."""
    lr_total_steps: int | None = Field(None, ge=1)
    """Optimizer steps the schedule spans, warm-up included; 'linear' and 'cosine' need it. PPO
    takes steps x ppo_epochs x num_mini_batches optimizer steps; SFT, RM and DPO one a batch."""
    lr_min_ratio: float = Field(0.0, ge=0, le=1)
    """Where 'linear' and 'cosine' end, as a fraction of lr."""

    @model_validator(mode="after")
    def _lr_schedule(self) -> RankGroupConfig:
        total, warmup = self.lr_total_steps, self.lr_warmup_steps
        if self.lr_schedule != "constant" and total is None:
            raise ValueError(
                f"lr_schedule={self.lr_schedule} decays over lr_total_steps: set it (PPO: "
                "steps x algorithm.ppo_epochs x algorithm.num_mini_batches)"
            )
        if total is not None and warmup > total:
            raise ValueError(f"lr_warmup_steps={warmup} is more than lr_total_steps={total}")
        return self


class PolicyConfig(RankGroupConfig):
    """The policy trainer; model_path is the initial policy (and the reference model unless
    reference.model_path is set)."""


class CriticConfig(RankGroupConfig):
    """The value-model trainer; model_path is a one-label token-classification model."""


class RunConfig(Section):
    """What every command's run has: where it writes and how it is seeded."""

    run_dir: str
    """Output directory: config.yaml, metrics.jsonl and what the command trains or reports."""
    seed: int = 0
    """Seed for data order, sampling, initialisation and synthetic data."""
    make_tiny_models: str | None = None
    """Demo only: build the tiny models into this directory first if they are absent."""
    make_tiny_size: Literal["tiny", "small", "100m", "100m-deep"] = "tiny"
    """The size make_tiny_models builds (`rayrlhf make-tiny --size`): 'tiny' is the demo's,
    'small' (4 layers x 256) the arithmetic task's, the 100M sizes are for benchmarks."""
    overwrite: bool = False
    """Replace a previous run in run_dir: a fresh run into a directory that holds one
    (config.yaml or metrics.jsonl) is refused before Ray starts unless this is set (or
    `resume`, PPO). Its outputs are deleted only once the pre-flight checks have passed;
    configured inputs inside run_dir (models, data) are kept."""


class RayRunConfig(RunConfig):
    """A run on Ray: which cluster, and how long any wait on it may last."""

    ray_address: str | None = None
    """Ray cluster address; None joins the job's cluster or starts a local one."""
    phase_timeout_s: float = Field(900.0, gt=0)
    """Longest wait for one phase (start-up, generate, score, train, sync, eval, save) before
    stopping with an error that names it."""
    placement_timeout_s: float = Field(60.0, gt=0)
    """Longest wait to reserve a role's resources before failing with what is missing."""
