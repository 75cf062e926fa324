"""Reward-model trainer: a ZeRO-3 rank of a one-label sequence classifier, Bradley-Terry loss.

Both sides of a pair run in one forward pass (`RewardBatch.stacked`, chosen rows first). The
score is read at each row's last real token by `sequence_scores`, which pools with the attention
mask, so left-padded prompts and right-padded responses both score the right position. It calls
`model.base_model` and `model.score` directly, so it gets `self.engine.module`: under ZeRO-3
those submodules carry the gather hooks themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rayrlhf.algorithms.preference import bradley_terry_loss
from rayrlhf.data.reward_pairs import RewardBatch
from rayrlhf.models.forward import sequence_scores
from rayrlhf.types import micro_batches
from rayrlhf.workers.deepspeed_role import DeepSpeedRole
from rayrlhf.workers.policy import check_finite


@dataclass(frozen=True)
class RMStepStats:
    """Means over one rank's micro-batches of one optimizer step."""

    loss: float
    accuracy: float
    """Fraction of pairs with r_chosen > r_rejected."""
    chosen_reward: float
    rejected_reward: float


def mean_rm_stats(stats: list[RMStepStats]) -> RMStepStats:
    """Field-wise mean (over micro-batches, or over equally sized rank shards)."""
    n = max(len(stats), 1)
    return RMStepStats(*(sum(getattr(s, f.name) for s in stats) / n for f in fields(RMStepStats)))


def pair_scores(model: nn.Module, batch: RewardBatch) -> tuple[Tensor, Tensor]:
    """Scores (chosen [B], rejected [B]) from one forward pass over 2B rows."""
    sequences, attention = batch.stacked()
    scores = sequence_scores(model, sequences, attention)
    return scores[: len(batch)], scores[len(batch) :]


def weighted_pair_eval(
    chosen: Tensor, rejected: Tensor, margin: Tensor, weight: Tensor
) -> tuple[float, float, float]:
    """(summed BT loss, correct pairs, pairs) over rows with weight 1; padding rows count 0."""
    losses = -F.logsigmoid(chosen - rejected - margin)
    correct = ((chosen > rejected).float() * weight).sum().item()
    return (losses * weight).sum().item(), correct, weight.sum().item()


class RewardTrainerWorker(DeepSpeedRole):
    """One ZeRO-3 rank of the reward model being trained; `micro_batch_size` counts pairs."""

    MODEL_KIND = "reward"

    def train_step(self, batch: RewardBatch) -> RMStepStats:
        """One optimizer step over this rank's shard (every rank gets the same number of pairs).

        DeepSpeed accumulates the micro-batches' gradients and steps at the boundary, which the
        driver aligns with the end of the shard (grad_accum_steps = shard / micro_batch_size).
        """
        self.engine.train()
        stats = []
        for mb in micro_batches(batch, self.spec.micro_batch_size):
            chosen, rejected = pair_scores(self.engine.module, mb)
            margin = mb.margin.to(chosen.device)
            loss, accuracy = bradley_terry_loss(chosen, rejected, margin)
            check_finite(loss, f"reward-model loss (rank {self.spec.rank})")
            self.engine.backward(loss)
            self.engine.step()
            stats.append(
                RMStepStats(
                    loss.item(), accuracy.item(), chosen.mean().item(), rejected.mean().item()
                )
            )
        return mean_rm_stats(stats)

    @torch.no_grad()
    def evaluate(self, batch: RewardBatch) -> tuple[float, float, float]:
        """(loss summed over pairs, correct pairs, pairs) on this rank's shard; rows with weight
        0 (padding to equal shards) are not counted. Collective: all ranks, equal shards."""
        self.engine.eval()
        totals = [0.0, 0.0, 0.0]
        for mb in micro_batches(batch, self.spec.micro_batch_size):
            chosen, rejected = pair_scores(self.engine.module, mb)
            parts = weighted_pair_eval(
                chosen.cpu(), rejected.cpu(), mb.margin.float(), mb.weight.float()
            )
            totals = [t + p for t, p in zip(totals, parts)]
        return totals[0], totals[1], totals[2]
