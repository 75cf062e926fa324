"""Data passed between roles: frozen dataclasses with their tensor shapes.

Layout of a batch of B sequences: each row is its prompt, left-padded to P tokens, followed by its
response, right-padded to R tokens, so T = P + R and every response starts at column P. Per-token
RL quantities live on the R response columns only: column j of `logprobs` is log p(token P+j |
tokens < P+j). `action_mask` marks real (non-padding) response tokens.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Generic, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class Timed(Generic[T]):
    """An actor method's result and the seconds it spent computing it (queueing excluded)."""

    value: T
    seconds: float


def timed(method: Callable[..., T]) -> Callable[..., Timed[T]]:
    """Make an actor method return `Timed`, so the driver can tell compute from orchestration."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs) -> Timed[T]:
        start = time.perf_counter()
        value = method(*args, **kwargs)
        return Timed(value, time.perf_counter() - start)

    return wrapper


@dataclass(frozen=True)
class Sample:
    """One generated response, as an engine returns it."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    """Engine logprob of each sampled response token."""
    text: str
    engine: int = 0
    """Index of the engine that generated it."""


@dataclass(frozen=True)
class Rollout:
    """Generated sequences from the vLLM engines."""

    sequences: Tensor
    """[B, T] int64 token ids: left-padded prompt then right-padded response."""
    attention_mask: Tensor
    """[B, T] int64, 1 on real tokens."""
    action_mask: Tensor
    """[B, R] float32, 1 on real response tokens."""
    engine_logprobs: Tensor
    """[B, R] float32 logprobs vLLM reported for the sampled tokens (0 on padding)."""
    prompts: tuple[str, ...]
    """B prompt texts."""
    responses: tuple[str, ...]
    """B response texts, as decoded by vLLM."""
    rows: tuple[dict, ...]
    """B dataset rows' other columns (every column but the prompt; {} for the demo task), as in
    `rayrlhf.data.prompts.PromptBatch.columns`: what reward functions read, e.g. an answer.
    A prompt's repeats share one dict: read, don't mutate."""

    @property
    def prompt_len(self) -> int:
        """P: the column where every response starts."""
        return self.sequences.shape[1] - self.action_mask.shape[1]

    def __len__(self) -> int:
        return self.sequences.shape[0]


@dataclass(frozen=True)
class RewardOutput:
    """What the reward actor computed for a rollout of B sequences (`workers.reward_fns`)."""

    scores: Tensor
    """[B] float32 weighted sum of every reward term; 0 where the sample is invalid."""
    valid: Tensor
    """[B] bool: every term gave a finite score (a None, NaN or inf makes the sample invalid:
    it trains on nothing)."""
    extras: dict[str, Tensor]
    """Named extras the reward functions reported (e.g. accuracy): name -> [B] float32, NaN
    where a sample has none."""

    def __len__(self) -> int:
        return self.scores.shape[0]

    def summary(self) -> dict[str, float]:
        """For the metrics log: `invalid` (count of invalid samples) and each extra's mean over
        the valid samples that have it (NaN if none has)."""
        out = {"invalid": float((~self.valid).sum().item())}
        for name, values in self.extras.items():
            out[name] = values[self.valid].nanmean().item() if self.valid.any() else float("nan")
        return out


@dataclass(frozen=True)
class Scores:
    """What the reward, reference, policy and critic actors computed for a rollout."""

    rewards: Tensor
    """[B] float32 sequence-level rewards (`reward.scores`: 0 on invalid samples)."""
    ref_logprobs: Tensor
    """[B, R] float32 reference-model logprobs (0 on padding)."""
    old_logprobs: Tensor | None
    """[B, R] float32 policy logprobs before the update (0 on padding); None when the update's
    own forward gives them (`algorithms.experience.update_gives_old_logprobs`)."""
    values: Tensor
    """[B, R] float32 critic values (0 on padding)."""
    reward: RewardOutput | None = None
    """The reward actor's whole output (validity, extras); None means all valid, no extras."""

    @property
    def valid(self) -> Tensor:
        """[B] bool: which samples have a valid reward (all of them when `reward` is None)."""
        if self.reward is None:
            return torch.ones(self.rewards.shape[0], dtype=torch.bool)
        return self.reward.valid


@dataclass(frozen=True)
class Experience:
    """A scored rollout with advantages: everything one PPO update needs."""

    sequences: Tensor
    """[B, T] int64, as in `Rollout`."""
    attention_mask: Tensor
    """[B, T] int64."""
    action_mask: Tensor
    """[B, R] float32."""
    old_logprobs: Tensor | None
    """[B, R] float32 policy logprobs at rollout time (recomputed by the trainer); None when the
    update is one on-policy pass: its own forward, detached, is the ratio's denominator."""
    ref_logprobs: Tensor
    """[B, R] float32 reference logprobs (for KL as a loss term)."""
    old_values: Tensor
    """[B, R] float32 critic values at rollout time (zeros when there is no critic)."""
    advantages: Tensor
    """[B, R] float32."""
    returns: Tensor
    """[B, R] float32 value targets."""

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def split(self, n: int) -> list[Experience]:
        """n equal row shards (one per data-parallel rank); B must be divisible by n."""
        return shard_rows(self, n)


@dataclass(frozen=True)
class LossNorm:
    """Global normalisers of one optimizer step, summed over its micro-batches on every rank.

    Each micro-batch divides its loss sum by these (not by its own counts), so the gradient of the
    step equals that of the whole mini-batch's aggregate however it was split.
    """

    tokens: float
    """Action tokens in the mini-batch."""
    sequences: float
    """Sequences with at least one action token in the mini-batch."""
    max_len: int
    """Constant length normaliser for seq_mean_token_sum (Dr. GRPO): the response budget."""


@dataclass(frozen=True)
class TrainStats:
    """Means over one rank's update of one step, for the metrics log."""

    loss: float
    """Policy or value loss."""
    approx_kl: float = 0.0
    """Policy: E[(r - 1) - log r], r = new/old probability ratio; 0 on the first micro-batch."""
    clipfrac: float = 0.0
    """Fraction of tokens whose ratio (or value) was clipped."""
    entropy: float = 0.0
    """Policy: mean per-token entropy of the policy distribution."""
    grad_norm: float = 0.0
    """Global gradient norm before clipping, mean over the optimizer steps applied."""
    skipped: float = 0.0
    """Optimizer steps skipped for a non-finite loss or gradient (every rank skips alike, so
    the mean over ranks is the count)."""
    skip_streak: float = 0.0
    """Optimizer steps skipped in a row, the longest run seen up to the end of this update
    (`mean_stats` takes its maximum): what `fault.max_skipped_steps` bounds."""


@dataclass(frozen=True)
class PolicyUpdate:
    """What one policy rank's `train_step` returns."""

    stats: TrainStats
    logprobs: Tensor | None = None
    """[b, R] float32 this rank's shard's logprobs from the update's forward, before its
    optimizer step (0 on padding): the old logprobs, when the score phase left them to the
    update (`Experience.old_logprobs` None); else None."""


@dataclass(frozen=True)
class StepUpdate:
    """A step's update over every rank of the policy and the critic."""

    policy: TrainStats
    critic: TrainStats
    logprobs: Tensor | None = None
    """[B, R] the update's own logprobs (`PolicyUpdate.logprobs`), every rank's rows in order;
    None when the score phase computed the old logprobs, or no update ran."""


@dataclass(frozen=True)
class SyncResult:
    """What one weight sync moved, and its verification."""

    fingerprint: str
    """`Fingerprint` hex digest over what was sent, in order: each tensor's name, dtype, shape,
    piece sizes and, when `hashed`, the XXH3-128 of each piece."""
    num_bytes: int
    """Bytes of parameters sent."""
    num_tensors: int
    """Parameters sent."""
    num_buckets: int
    """Gather-and-send rounds."""
    hashed: bool = True
    """Whether the fingerprint covers the bytes (see `sync.verify_every`) or only the records."""


def shard_rows(batch, n: int) -> list:
    """Split every tensor field of a frozen batch dataclass into n equal row shards."""
    size = len(batch)
    if size % n:
        raise ValueError(f"batch of {size} rows does not split into {n} equal shards")
    step = size // n
    return [_rows(batch, i * step, (i + 1) * step) for i in range(n)]


def micro_batches(batch, size: int) -> list:
    """Consecutive row chunks of at most `size` rows."""
    n = (len(batch) + size - 1) // size
    return [_rows(batch, i * size, min((i + 1) * size, len(batch))) for i in range(n)]


def _rows(batch, start: int, stop: int):
    """Rows [start, stop) of every field; a None field stays None."""
    sliced = {f.name: getattr(batch, f.name) for f in fields(batch)}
    return replace(batch, **{k: v[start:stop] for k, v in sliced.items() if v is not None})


def pad_rows(rows: list[list[int]], pad: int, left: bool) -> Tensor:
    """[len(rows), max_len] int64 tensor of `rows` padded on the left or right."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        if r and left:
            out[i, width - len(r) :] = torch.tensor(r)
        elif r:
            out[i, : len(r)] = torch.tensor(r)
    return out
