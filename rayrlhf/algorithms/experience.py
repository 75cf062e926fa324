"""From engine samples to a training batch: padding layout, shaped rewards, advantages.

Pure tensor code (no Ray, DeepSpeed or vLLM), so the driver's step is testable on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rayrlhf.algorithms.estimators import get_estimator
from rayrlhf.algorithms.kl import kl_estimate
from rayrlhf.algorithms.losses import explained_variance
from rayrlhf.algorithms.masked import masked_sum
from rayrlhf.algorithms.rewards import RunningMoments, clip_rewards
from rayrlhf.config import AlgorithmConfig
from rayrlhf.types import Experience, LossNorm, Rollout, Sample, Scores, pad_rows


@dataclass(frozen=True)
class RolloutStats:
    """Per-step statistics of the generated batch."""

    reward_mean: float
    reward_std: float
    kl: float
    """Mean over sequences of the summed per-token KL estimate to the reference."""
    response_length: float
    """Mean response length in tokens."""
    tokens: int
    """Response tokens generated this step."""
    total_tokens: int
    """Prompt plus response tokens of the batch (what each training pass reads)."""
    explained_variance: float
    """How well the critic's values predicted the returns (1 = perfectly)."""
    engine_logprob_diff: float
    """Max |engine logprob - trainer logprob| over sampled tokens: large means broken sync
    (in fp32; in half precision a correct sync's max grows with depth and batch)."""
    engine_logprob_gap_mean: float = 0.0
    """Mean of the same gap over sampled tokens: the check that holds in every precision
    (`losses.ENGINE_LOGPROB_GAP_LIMITS`)."""


def assemble_rollout(
    samples: list[Sample], prompts: list[str], pad_id: int, rows: list[dict] | None = None
) -> Rollout:
    """Left-pad prompts and right-pad responses into the layout of `rayrlhf.types`. `rows` are
    the prompts' dataset columns (`PromptBatch.columns`); None gives each sample {}."""
    if len(samples) != len(prompts):
        raise ValueError(f"{len(samples)} samples for {len(prompts)} prompts")
    rows = [{} for _ in samples] if rows is None else rows
    if len(rows) != len(samples):
        raise ValueError(f"{len(rows)} dataset rows for {len(samples)} samples")
    prompt_ids = pad_rows([s.prompt_ids for s in samples], pad_id, left=True)
    responses = pad_rows([s.response_ids for s in samples], pad_id, left=False)
    prompt_mask = pad_rows([[1] * len(s.prompt_ids) for s in samples], 0, left=True)
    action_mask = pad_rows([[1] * len(s.response_ids) for s in samples], 0, left=False)
    width = responses.shape[1]
    engine_lp = torch.zeros(len(samples), width)
    for i, s in enumerate(samples):
        engine_lp[i, : len(s.logprobs)] = torch.tensor(s.logprobs)
    return Rollout(
        sequences=torch.cat([prompt_ids, responses], 1),
        attention_mask=torch.cat([prompt_mask, action_mask], 1),
        action_mask=action_mask.float(),
        engine_logprobs=engine_lp,
        prompts=tuple(prompts),
        responses=tuple(s.text for s in samples),
        rows=tuple(rows),
    )


def shape_rewards(
    rewards: torch.Tensor,
    algo: AlgorithmConfig,
    moments: RunningMoments | None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sequence rewards [B] after optional clipping and running normalisation. Only the valid
    samples (`valid` [B] bool, None: all) update the running moments: an invalid sample's
    placeholder 0 is no reward."""
    if algo.reward_clip is not None:
        rewards = clip_rewards(rewards, algo.reward_clip)
    if moments is not None:
        moments.update(rewards if valid is None else rewards[valid])
        rewards = moments.normalize(rewards)
    return rewards


def update_gives_old_logprobs(algo: AlgorithmConfig) -> bool:
    """Whether the score phase can leave the old logprobs to the update: with one epoch and one
    mini-batch there is one optimizer step, after every micro-batch's forward, so that forward
    computes exactly the old logprobs (TRL skips the pass alike, `num_iterations=1`). Not with
    the KL in the reward: the advantages need it before the update."""
    return algo.ppo_epochs == 1 and algo.num_mini_batches == 1 and algo.kl_mode == "loss"


def make_experience(
    rollout: Rollout,
    scores: Scores,
    algo: AlgorithmConfig,
    kl_coef: float,
    moments: RunningMoments | None = None,
) -> tuple[Experience, RolloutStats]:
    """Shaped rewards and the KL to the reference -> advantages (and returns, for the critic).

    `kl_coef` is the controller's current beta; in kl_mode "loss" the KL enters the policy loss
    instead, so no reward penalty is applied here. Samples without a valid reward
    (`Scores.valid`) enter no reward statistic and get advantages and returns of 0; the
    driver also drops them from the action mask.
    """
    mask = rollout.action_mask
    beta = kl_coef if algo.kl_mode == "reward" else 0.0
    if scores.old_logprobs is None and beta:
        raise ValueError("the KL penalty in the reward needs the old logprobs before the update")
    kl = policy_kl(scores.old_logprobs, scores.ref_logprobs, mask, algo)
    valid = scores.valid
    rewards = shape_rewards(scores.rewards, algo, moments, valid)
    estimate = get_estimator(algo.advantage)
    advantages, returns = estimate(rewards, kl, beta, scores.values, mask, algo, valid)
    exp = Experience(
        sequences=rollout.sequences,
        attention_mask=rollout.attention_mask,
        action_mask=mask,
        old_logprobs=scores.old_logprobs,
        ref_logprobs=scores.ref_logprobs,
        old_values=scores.values,
        advantages=advantages,
        returns=returns,
    )
    return exp, rollout_stats(rollout, scores, kl, returns)


def policy_kl(old, ref: torch.Tensor, mask: torch.Tensor, algo: AlgorithmConfig) -> torch.Tensor:
    """[B, R] per-token KL estimate of the policy to the reference; zeros (no penalty) while
    the old logprobs are the update's to give."""
    if old is None:
        return torch.zeros_like(mask)
    return kl_estimate(old, ref, algo.kl_estimator) * mask


def rollout_stats(rollout: Rollout, scores: Scores, kl: torch.Tensor, returns) -> RolloutStats:
    """The step's figures. While the old logprobs are the update's to give, the KL and the
    engine agreement are NaN until `with_update_logprobs` fills them in. The reward's mean and
    std are over the valid samples (NaN when none is); explained variance is over the tokens
    that train the critic (valid samples')."""
    mask = rollout.action_mask
    lengths = mask.sum(1)
    diff, gap_mean = engine_agreement(rollout, scores.old_logprobs)
    known = scores.old_logprobs is not None
    reward_mean, reward_std = valid_moments(scores.rewards, scores.valid)
    trained = mask * scores.valid.to(mask.dtype).unsqueeze(1)
    return RolloutStats(
        reward_mean=reward_mean,
        reward_std=reward_std,
        kl=masked_sum(kl, mask, dim=1).mean().item() if known else float("nan"),
        response_length=lengths.mean().item(),
        tokens=int(lengths.sum().item()),
        total_tokens=int(rollout.attention_mask.sum().item()),
        explained_variance=explained_variance(scores.values, returns, trained).item(),
        engine_logprob_diff=diff,
        engine_logprob_gap_mean=gap_mean,
    )


def valid_moments(rewards: torch.Tensor, valid: torch.Tensor) -> tuple[float, float]:
    """Mean and sample std of `rewards` [B] over its `valid` [B] entries: NaN for both with no
    valid entry (the metrics writers log NaN as a gap), std 0.0 with one."""
    kept = rewards[valid].double()
    if kept.numel() == 0:
        return float("nan"), float("nan")
    return kept.mean().item(), kept.std().item() if kept.numel() > 1 else 0.0


def engine_agreement(rollout: Rollout, old) -> tuple[float, float]:
    """Max and mean |engine logprob - trainer logprob| over the sampled tokens (NaN without
    the trainer's)."""
    if old is None:
        return float("nan"), float("nan")
    mask = rollout.action_mask
    gap = (rollout.engine_logprobs - old).abs()
    gap = torch.where(mask.bool(), gap, torch.zeros_like(gap))  # padding may hold inf
    return gap.max().item(), (gap.sum() / mask.sum().clamp(min=1)).item()


def with_update_logprobs(
    stats: RolloutStats, rollout: Rollout, ref_logprobs: torch.Tensor, update_logprobs, algo
) -> RolloutStats:
    """`stats` with the KL to the reference and the engine agreement measured on the logprobs
    the update's forward gave ([B, R], `update_gives_old_logprobs`): the figures the score
    phase's own forward would have given."""
    mask = rollout.action_mask
    old = update_logprobs * mask
    kl = policy_kl(old, ref_logprobs, mask, algo)
    diff, gap_mean = engine_agreement(rollout, old)
    kl_mean = masked_sum(kl, mask, dim=1).mean().item()
    return replace(stats, kl=kl_mean, engine_logprob_diff=diff, engine_logprob_gap_mean=gap_mean)


def loss_norms(exp: Experience, ranks: int, mini_batches: int, max_len: int) -> list[LossNorm]:
    """The normalisers of each optimizer step, in the order every rank takes its mini-batches.

    Rank r trains on shard r (`Experience.split`) and splits it into `mini_batches` consecutive
    chunks; step k sums chunk k of every rank.
    """
    tokens = [[0.0] * mini_batches for _ in range(ranks)]
    seqs = [[0.0] * mini_batches for _ in range(ranks)]
    for r, shard in enumerate(exp.split(ranks)):
        for k, chunk in enumerate(shard.split(mini_batches)):
            per_row = chunk.action_mask.sum(1)
            tokens[r][k] = per_row.sum().item()
            seqs[r][k] = (per_row > 0).sum().item()
    return [
        LossNorm(sum(t[k] for t in tokens), sum(s[k] for s in seqs), max_len)
        for k in range(mini_batches)
    ]
