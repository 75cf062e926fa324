"""The PPO run's sections (`rayrlhf train`): one model per component, and `TrainConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from rayrlhf.config.base import CriticConfig, PolicyConfig, RayRunConfig, Resources, Section
from rayrlhf.config.loading import load_recipe
from rayrlhf.config.rewards import RewardConfig

DEFAULT_CONFIG = "tiny-cpu.yaml"


class ReferenceConfig(Section):
    model_path: str | None = None
    """HF directory of the frozen reference model; None means the policy's initial weights."""
    micro_batch_size: int = Field(16, ge=1)
    """Sequences per forward pass."""
    resources: Resources = Resources()
    """Resources of the reference actor."""


class RolloutConfig(Section):
    num_engines: int = Field(1, ge=1)
    """vLLM engines (Ray actors), scaled independently of the trainer ranks."""
    max_engines: int | None = Field(None, ge=1)
    """The most engines `rayrlhf scale` will ask for (None: num_engines). Only a local Ray
    uses it, to size itself with room for them; a cluster grants what it has."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM tensor parallelism inside each engine (GPU only)."""
    max_new_tokens: int = Field(24, ge=1)
    """Maximum response length in tokens."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature. PPO assumes 1.0: the trainer's logprobs are untempered."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold (1.0 = off, which PPO's logprob maths assumes)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """vLLM compute dtype; 'auto' takes the checkpoint's."""
    kv_cache_gib: float | None = Field(0.25, gt=0)
    """KV-cache size in GiB (CPU engines need it); None lets vLLM size it from GPU memory."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """Fraction of GPU memory vLLM may use (GPU engines, when kv_cache_gib is None)."""
    enforce_eager: bool = True
    """Skip CUDA-graph capture (faster start-up; turn off for long GPU runs)."""
    resources: Resources = Resources()
    """Resources of each engine's actor (GPUs = tensor_parallel_size on a GPU cluster)."""
    stop: list[str] = []
    """Stop strings (vLLM's `stop`): a response ends after the token that completes one; its
    tokens stay in the response (the policy learns to write them), its text (what a reward rule
    reads) ends before the stop string. EOS and the generation config's stop tokens always
    stop."""

    @field_validator("resources")
    @classmethod
    def _no_engine_threads(cls, res: Resources) -> Resources:
        if res.num_threads is not None:
            raise ValueError("vLLM binds its own threads: set VLLM_CPU_OMP_THREADS_BIND instead")
        return res


OnBadRow = Literal["error", "skip"]
"""A malformed data row stops the run naming its file and line or row ('error'), or is left out
and counted in the log ('skip')."""
ChatTemplateMode = Literal["auto", "on", "off"]
"""How prompts meet the policy tokenizer's chat template (`rayrlhf.data.chat`)."""


class DataConfig(Section):
    """The prompt set: rows of text or chat messages, from a file, a dataset or the demo task."""

    prompts: str = "demo"
    """A JSONL file, a parquet file, a `datasets.save_to_disk` directory, or 'demo' for the
    built-in kind-words task."""
    prompt_key: str = "prompt"
    """Column of the prompt: text, or a list of chat messages {role, content}."""
    messages_key: str = "messages"
    """Column of a list of chat messages, read when a row has no `prompt_key` column."""
    chat_template: ChatTemplateMode = "auto"
    """'auto': every prompt (text as one user message) goes through the policy tokenizer's chat
    template with add_generation_prompt, if it has one; 'on': the same, and a tokenizer without
    a template is an error; 'off': raw text (messages' contents joined by newlines)."""
    max_prompt_tokens: int = Field(64, ge=1)
    """Most tokens in a prompt, chat template included."""
    overlong: Literal["error", "drop"] = "error"
    """A prompt over max_prompt_tokens stops the run naming its row ('error'), or is left out
    and counted ('drop')."""
    on_bad_row: OnBadRow = "error"
    """A malformed row stops the run naming its file and line or row ('error'), or is left out
    and counted ('skip')."""
    num_demo_prompts: int = Field(512, ge=1)
    """Prompts generated when `prompts` is 'demo'."""

    @field_validator("chat_template", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: object) -> object:
        # YAML 1.1 reads a bare on/off as a boolean, in recipes and in --set alike.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class EvalConfig(Section):
    """Evaluation during PPO: greedy (or sampled) responses to held-out prompts, scored by the
    reward, logged as eval/* with the step's record."""

    every_steps: int = Field(0, ge=0)
    """Evaluate after every N-th step (N, 2N, ...); 0 turns evaluation off."""
    prompts: str = "demo"
    """Held-out prompts, in any format of data.prompts (read with data's settings); 'demo'
    draws demo prompts with another seed than training's."""
    num_prompts: int = Field(64, ge=1)
    """Prompts per evaluation: the first N of eval.prompts (all of them if fewer)."""
    greedy: bool = True
    """Greedy responses; false samples them as training does (seeded by the step)."""
    at_start: bool = False
    """Also evaluate the starting policy before the first PPO step: a record of eval/* alone
    with step -1 (plotted and reported at 0 steps done, "before PPO"). Works with every_steps
    0 too (then the only evaluation)."""
    gold: str | None = None
    """A 'module:function' reward function (the reward contract: prompts, responses, rows ->
    floats or dicts with a score and extras) that scores the same eval responses as the
    training reward, for evaluation only (it never trains): eval/gold and eval/gold/<extra>.
    With a learned reward model as the proxy, gold falling while eval/reward_mean rises is
    reward hacking (the pipeline report warns)."""


class CheckpointConfig(Section):
    """Checkpoints of a PPO run in run_dir/checkpoints/step_N/ (`rayrlhf.runtime.checkpoint`)."""

    every_steps: int = Field(0, ge=0)
    """Write a checkpoint after every N-th step (N, 2N, ...); 0 turns periodic checkpoints off
    (a SIGTERM or SIGINT still writes one before the run stops)."""
    keep_last: int = Field(2, ge=1)
    """Complete checkpoints kept; older ones are deleted once a newer one is complete."""


class FaultConfig(Section):
    """What the driver does about failures (`rayrlhf.runtime.faults`)."""

    max_restarts: int = Field(0, ge=0)
    """When a role's actor dies or hangs, rebuild every role and go on from the newest
    complete checkpoint (step 0 without one), at most this many times per launch; 0 stops the
    run with one line naming the role, rank, phase and step."""
    hang_factor: float = Field(10.0, gt=1)
    """A phase is hung once it has run this many times longer than its slowest completed
    run so far (after `hang_warmup` runs of it); see `hang_min_s`."""
    hang_min_s: float = Field(60.0, gt=0)
    """The adaptive hang limit is never below this many seconds (nor above phase_timeout_s)."""
    hang_warmup: int = Field(2, ge=1)
    """Completed runs of a phase before its limit adapts; until then phase_timeout_s holds."""
    max_engine_restarts: int = Field(3, ge=0)
    """A vLLM engine that dies or hangs is replaced in place, its rows generated again by the
    others with the same seeds, at most this many times per launch; the next loss is a role
    failure (`max_restarts`). 0 treats an engine like every other role."""
    max_skipped_steps: int = Field(3, ge=1)
    """Consecutive optimizer steps skipped for a non-finite loss or gradient before the run
    stops (the last good checkpoint is kept)."""


# Each algorithm choice's names, declared once. The registries in rayrlhf/algorithms/ that
# implement them are keyed by exactly these names and check so when imported.
AdvantageName = Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"]
"""Advantage estimators (`algorithms.estimators.ADVANTAGE_ESTIMATORS`)."""
GROUP_ESTIMATORS: tuple[AdvantageName, ...] = ("grpo", "dr_grpo", "rloo")
"""Estimators that compare the samples of a prompt, so need n_samples_per_prompt >= 2."""
CRITIC_ESTIMATORS: tuple[AdvantageName, ...] = ("gae",)
"""Estimators that use the critic's values; the others start no critic actor."""
KLEstimatorName = Literal["k1", "k2", "k3"]
"""Per-token KL estimators, Schulman 2020 (`algorithms.kl.KL_ESTIMATORS`)."""
AggregationMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]
"""How per-token losses become one number (`algorithms.losses.AGGREGATIONS`)."""
PreferenceLossName = Literal["dpo", "ipo", "cdpo", "kto", "orpo", "simpo"]
"""Offline preference losses of `rayrlhf dpo` (`algorithms.preference.PREFERENCE_LOSSES`)."""


class AlgorithmConfig(Section):
    advantage: AdvantageName = "gae"
    """Advantage estimator. gae uses the critic; grpo, dr_grpo, rloo and reinforce_pp do not (the
    critic actor is then not started)."""
    n_samples_per_prompt: int = Field(1, ge=1)
    """Responses sampled per prompt: the group that grpo, dr_grpo and rloo compare within."""
    rollout_batch_size: int = Field(32, ge=1)
    """Sequences generated and trained on per step (prompts x n_samples_per_prompt)."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each step's rollouts."""
    num_mini_batches: int = Field(1, ge=1)
    """Optimizer steps per pass: the batch is split into this many mini-batches."""
    clip_eps: float = Field(0.2, gt=0)
    """PPO ratio clip epsilon."""
    value_clip_eps: float | None = Field(0.2, gt=0)
    """Value-function clip around the rollout's values; None disables it."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount factor."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    kl_coef: float = Field(0.05, ge=0)
    """KL coefficient (beta) against the reference; the adaptive controller's starting value."""
    kl_estimator: KLEstimatorName = "k1"
    """KL estimator (Schulman 2020). As a loss term use k3: k1's gradient is zero in expectation."""
    kl_mode: Literal["reward", "loss"] = "reward"
    """KL as a per-token reward penalty (InstructGPT) or as a policy-loss term (GRPO)."""
    kl_controller: Literal["fixed", "adaptive"] = "fixed"
    """fixed keeps kl_coef; adaptive steers it towards kl_target (Ziegler et al. 2019)."""
    kl_target: float = Field(6.0, gt=0)
    """Adaptive controller: target KL per sequence, in nats."""
    kl_horizon: int = Field(10000, ge=1)
    """Adaptive controller: horizon in sequences; smaller reacts faster."""
    kl_gain: float = Field(0.0, ge=0)
    """Adaptive controller: proportional gain that damps Ziegler's integral update
    (beta = beta_I * exp(kl_gain * error)); 0 is Ziegler's controller exactly."""
    kl_coef_min: float = Field(0.0, ge=0)
    """Adaptive controller: floor on beta, against wind-up while KL is still below target."""
    kl_coef_max: float | None = Field(None, gt=0)
    """Adaptive controller: ceiling on beta; None for none."""
    whiten_advantages: bool = True
    """gae: normalise advantages to zero mean and unit std over the batch."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip constant c > 1 bounding the loss of negative-advantage tokens (Ye et al. 2020)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus coefficient (subtracted from the policy loss)."""
    reward_clip: float | None = Field(None, gt=0)
    """Clip sequence rewards to [-reward_clip, reward_clip] before anything else."""
    reward_normalize: bool = False
    """Divide rewards by a running std (and remove the running mean) over the whole run."""
    loss_aggregation: AggregationMode = "token_mean"
    """How per-token losses become one number; normalised over the whole optimizer step across
    micro-batches and ranks, so the result does not depend on how the batch is split."""
    mask_truncated: bool = False
    """DAPO's overlong filter (Yu et al. 2025): responses cut at rollout.max_new_tokens (no EOS
    or stop string) carry no policy or value loss; their rewards still count in the batch and
    group statistics. The step's share of them is logged as rollout/truncated_frac."""

    @model_validator(mode="after")
    def _groups(self) -> AlgorithmConfig:
        n = self.n_samples_per_prompt
        if self.rollout_batch_size % n:
            raise ValueError(
                f"algorithm.rollout_batch_size={self.rollout_batch_size} must be "
                f"divisible by algorithm.n_samples_per_prompt={n}"
            )
        if self.advantage in GROUP_ESTIMATORS and n < 2:
            raise ValueError(
                f"algorithm.advantage={self.advantage} compares samples of a prompt: "
                "set algorithm.n_samples_per_prompt >= 2"
            )
        lo, hi = self.kl_coef_min, self.kl_coef_max
        if self.kl_controller == "adaptive" and not lo <= self.kl_coef <= (hi or float("inf")):
            raise ValueError(
                f"algorithm.kl_coef={self.kl_coef} must lie within [kl_coef_min={lo}, "
                f"kl_coef_max={hi}] for the adaptive controller"
            )
        return self

    @property
    def needs_critic(self) -> bool:
        return self.advantage in CRITIC_ESTIMATORS


class SyncConfig(Section):
    transport: Literal["auto", "shared_memory", "object_store", "broadcast"] = "auto"
    """How weights reach the engines: 'shared_memory', a /dev/shm segment the policy ranks write
    and the engines read, on one node only; 'object_store', Ray's, across nodes; 'broadcast', a
    torch.distributed group (NCCL on GPUs). 'auto' is shared_memory when the policy ranks and
    the engines share a node with room in /dev/shm, else object_store."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Broadcast backend; 'auto' is NCCL with GPUs, gloo without."""
    bucket_mb: float = Field(64.0, gt=0)
    """Parameters are gathered from ZeRO-3 and sent in buckets of about this many MiB."""
    max_in_flight: int = Field(2, ge=0)
    """shared_memory and object_store: buckets sent ahead of the engines' loads. Bounds the
    object-store memory a sync holds to about (max_in_flight + 1) x bucket_mb; 0 waits for
    every load."""
    verify_every: int = Field(1, ge=1)
    """Hash the weights' bytes on both ends of every N-th sync, the first included, and compare.
    Every sync compares names, dtypes, shapes and sizes; a mismatch stops the run. 1 checks every
    byte of every sync. Hashing runs at about 17 GB/s per core, but a GPU's weights must first be
    copied to the host: for a large model that can cost more than the transfer, so check the
    bytes every few syncs there."""
    group_timeout_s: float = Field(300.0, gt=0)
    """broadcast: longest wait, in seconds, for every member to join the sync group and for any
    one broadcast (gloo and NCCL alike), so that a dead engine mid-sync fails the run instead of
    hanging policy rank 0."""


class MetricsConfig(Section):
    prometheus: bool = True
    """Serve Prometheus metrics from the driver while the run lasts."""
    host: str = "127.0.0.1"
    """Bind address of /metrics; the default keeps it off the network."""
    port: int = Field(9464, ge=0, le=65535)
    """Port of /metrics; 0 picks a free one (the URL is printed at start)."""
    plots: bool = True
    """Write PNG plots of reward, KL, tokens/sec (and eval reward) into run_dir at the end."""
    tensorboard: bool = True
    """Also write every metric to TensorBoard event files in run_dir
    (`tensorboard --logdir runs/`)."""


class TrainConfig(RayRunConfig):
    """A PPO run (`rayrlhf train`): run_dir gets metrics.jsonl, config.yaml and the final HF
    policy."""

    steps: int = Field(40, ge=1)
    """PPO steps (generate, score, update, sync) to run."""
    save_final: bool = True
    """Save the final policy in HF format under run_dir/policy."""
    policy: PolicyConfig
    """The policy trainer (DeepSpeed ZeRO-3 ranks)."""
    critic: CriticConfig | None = None
    """The value-model trainer (DeepSpeed ZeRO-3 ranks); needed by algorithm.advantage=gae."""
    reference: ReferenceConfig = ReferenceConfig()
    """The frozen reference model for the KL penalty."""
    reward: RewardConfig
    """The reward: a weighted sum of a reward model, reward functions and a reward server."""
    rollout: RolloutConfig = RolloutConfig()
    """The vLLM rollout engines."""
    data: DataConfig = DataConfig()
    """The prompt set."""
    algorithm: AlgorithmConfig = AlgorithmConfig()
    """PPO and advantage-estimation settings."""
    sync: SyncConfig = SyncConfig()
    """Weight sync from the policy trainer to the engines."""
    metrics: MetricsConfig = MetricsConfig()
    """Prometheus endpoint, TensorBoard event files and run-report plots."""
    eval: EvalConfig = EvalConfig()
    """Evaluation on held-out prompts during training (off by default)."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Periodic checkpoints for exact resume (off by default)."""
    fault: FaultConfig = FaultConfig()
    """Restarts after a dead or hung actor, hang detection, non-finite step budget."""
    resume: bool = False
    """Continue from the newest complete checkpoint in run_dir (`rayrlhf train --resume`)."""

    @model_validator(mode="after")
    def _batches_divide(self) -> TrainConfig:
        if self.algorithm.needs_critic and self.critic is None:
            free = ", ".join(n for n in get_args(AdvantageName) if n not in CRITIC_ESTIMATORS)
            raise ValueError(
                f"critic: required by algorithm.advantage={self.algorithm.advantage} (or pick "
                f"a critic-free estimator: {free})"
            )
        roles = [("policy", self.policy)]
        if self.algorithm.needs_critic:
            roles.append(("critic", self.critic))
        for name, role in roles:
            per_pass = role.micro_batch_size * role.num_ranks * self.algorithm.num_mini_batches
            if self.algorithm.rollout_batch_size % per_pass:
                raise ValueError(
                    f"algorithm.rollout_batch_size={self.algorithm.rollout_batch_size} must be "
                    "divisible by "
                    f"{name}.micro_batch_size x {name}.num_ranks x algorithm.num_mini_batches "
                    f"= {per_pass}"
                )
        return self

    @property
    def active_critic(self) -> CriticConfig | None:
        """The critic when the estimator uses one; otherwise None (no actor, no resources)."""
        return self.critic if self.algorithm.needs_critic else None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Load a PPO recipe (default: the embedded tiny CPU one), apply overrides, validate."""
    return load_recipe(TrainConfig, DEFAULT_CONFIG, path, overrides)
