"""Critic role: a DeepSpeed ZeRO-3 rank of the value model (a one-label token classifier).

It starts from a value model, a reward model or a causal LM such as the policy (a fresh head on
its backbone, `models.forward.load_model`). Dropout is off, so `forward_values` (eval mode) and
`train_step` (train mode) compute one function: before the first update the values trained on
are the old values.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from rayrlhf.algorithms.losses import value_loss
from rayrlhf.models.forward import response_values
from rayrlhf.types import Experience, Rollout, TrainStats, micro_batches, timed
from rayrlhf.workers.deepspeed_role import DeepSpeedRole, StepOutcome
from rayrlhf.workers.policy import mean_stats


class CriticWorker(DeepSpeedRole):
    """One rank of the critic trainer."""

    MODEL_KIND = "value"

    @timed
    @torch.no_grad()
    def forward_values(self, rollout: Rollout) -> torch.Tensor:
        """[b, R] values of this rank's shard of the rollout."""
        self.engine.eval()
        r = rollout.action_mask.shape[1]
        out = [
            response_values(self.engine, mb.sequences, mb.attention_mask, r).cpu()
            for mb in micro_batches(rollout, self.spec.micro_batch_size)
        ]
        return torch.cat(out) * rollout.action_mask

    @timed
    def train_step(self, exp: Experience, clip_eps: float | None) -> TrainStats:
        """One pass of (clipped) value regression onto the GAE returns over this rank's shard."""
        self.engine.train()
        r = exp.action_mask.shape[1]
        stats, outcomes = [], []
        for mb in micro_batches(exp, self.spec.micro_batch_size):
            values = response_values(self.engine, mb.sequences, mb.attention_mask, r)
            dev = values.device
            loss, clipfrac = value_loss(
                values, mb.old_values.to(dev), mb.returns.to(dev), mb.action_mask.to(dev), clip_eps
            )
            outcomes.append(self.backward_step(loss))  # non-finite: step skipped
            stats.append(TrainStats(loss=loss.item(), clipfrac=float(clipfrac)))
        return replace(mean_stats(stats), **StepOutcome.fields(outcomes))
