"""From engine samples to a PPO batch: padding layout, KL-shaped rewards, GAE, whitening.

Pure tensor code (no Ray, DeepSpeed or vLLM), so the driver's step is testable on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayrlhf.algorithms.advantages import gae, terminal_rewards_with_kl, whiten_advantages
from rayrlhf.algorithms.kl import kl_estimate
from rayrlhf.algorithms.losses import explained_variance
from rayrlhf.algorithms.masked import masked_sum
from rayrlhf.config import PPOConfig
from rayrlhf.types import Experience, Rollout, Scores, pad_rows
from rayrlhf.workers.rollout import Sample


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
    """Max |engine logprob - trainer logprob| over sampled tokens: large means broken sync."""


def assemble_rollout(samples: list[Sample], prompts: list[str], pad_id: int) -> Rollout:
    """Left-pad prompts and right-pad responses into the layout of `rayrlhf.types`."""
    if len(samples) != len(prompts):
        raise ValueError(f"{len(samples)} samples for {len(prompts)} prompts")
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
    )


def make_experience(
    rollout: Rollout, scores: Scores, ppo: PPOConfig
) -> tuple[Experience, RolloutStats]:
    """KL-penalised token rewards -> GAE advantages and returns (whitened if configured)."""
    mask = rollout.action_mask
    kl = kl_estimate(scores.old_logprobs, scores.ref_logprobs, ppo.kl_estimator) * mask
    token_rewards = terminal_rewards_with_kl(scores.rewards, kl, mask, ppo.kl_coef)
    advantages, returns = gae(token_rewards, scores.values, mask, ppo.gamma, ppo.lam)
    if ppo.whiten_advantages:
        advantages = whiten_advantages(advantages, mask)
    exp = Experience(
        sequences=rollout.sequences,
        attention_mask=rollout.attention_mask,
        action_mask=mask,
        old_logprobs=scores.old_logprobs,
        old_values=scores.values,
        advantages=advantages,
        returns=returns,
    )
    lengths = mask.sum(1)
    gap = (rollout.engine_logprobs - scores.old_logprobs).abs()
    diff = torch.where(mask.bool(), gap, torch.zeros_like(gap)).max()  # padding may hold inf
    stats = RolloutStats(
        reward_mean=scores.rewards.mean().item(),
        reward_std=scores.rewards.std().item() if len(rollout) > 1 else 0.0,
        kl=masked_sum(kl, mask, dim=1).mean().item(),
        response_length=lengths.mean().item(),
        tokens=int(lengths.sum().item()),
        total_tokens=int(rollout.attention_mask.sum().item()),
        explained_variance=explained_variance(scores.values, returns, mask).item(),
        engine_logprob_diff=diff.item(),
    )
    return exp, stats
