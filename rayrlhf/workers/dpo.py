"""DPO roles: a ZeRO-3 policy rank that takes DPO steps, and the frozen reference for pairs.

Both sides of a pair run in one forward pass (`PreferenceBatch.stacked`, chosen rows first), so
each ZeRO-3 parameter gather serves 2 x micro_batch_size sequences. A pair's log-probability is
the sum of its response tokens' log-probs (`sequence_logps`), EOS included.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from rayrlhf.algorithms.preference import dpo_loss, sequence_logps
from rayrlhf.data.preferences import PreferenceBatch
from rayrlhf.models.forward import response_logprobs
from rayrlhf.types import micro_batches
from rayrlhf.workers.policy import PolicyWorker, check_finite
from rayrlhf.workers.reference import ReferenceWorker


@dataclass(frozen=True)
class DPOStepStats:
    """Means over one rank's micro-batches of one DPO step (implicit rewards: beta x log-ratio)."""

    loss: float
    reward_accuracy: float
    """Fraction of pairs whose chosen implicit reward beats the rejected one."""
    chosen_reward: float
    rejected_reward: float
    margin: float
    """Mean of chosen minus rejected implicit reward."""


def mean_dpo_stats(stats: list[DPOStepStats]) -> DPOStepStats:
    """Field-wise mean (over micro-batches, or over equally sized rank shards)."""
    n = max(len(stats), 1)
    return DPOStepStats(*(sum(getattr(s, f.name) for s in stats) / n for f in fields(DPOStepStats)))


@dataclass(frozen=True)
class PairLogps:
    """Sequence log-probs of every pair of a set, by row."""

    chosen: Tensor
    """[N] float32."""
    rejected: Tensor
    """[N] float32."""


@dataclass(frozen=True)
class EvalStats:
    """Implicit-reward statistics on held-out pairs."""

    reward_accuracy: float
    """Fraction of pairs whose implicit reward is higher for chosen than for rejected."""
    margin: float
    """Mean implicit-reward margin, chosen minus rejected."""
    pairs: int


def implicit_reward_eval(policy: PairLogps, ref: PairLogps, beta: float) -> EvalStats:
    """Accuracy and mean margin of the implicit rewards beta x (log pi - log pi_ref)."""
    margin = beta * ((policy.chosen - ref.chosen) - (policy.rejected - ref.rejected))
    return EvalStats((margin > 0).float().mean().item(), margin.mean().item(), len(margin))


def pair_logps(model: nn.Module, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
    """Sequence log-probs (chosen [B], rejected [B]) from one forward pass over 2B rows."""
    sequences, attention, action = batch.stacked()
    token_lp, _ = response_logprobs(model, sequences, attention, action.shape[1])
    logps = sequence_logps(token_lp, action.to(token_lp.device))
    return logps[: len(batch)], logps[len(batch) :]


@torch.no_grad()
def pair_logps_batched(
    model: nn.Module, batch: PreferenceBatch, size: int
) -> tuple[Tensor, Tensor]:
    """`pair_logps` over micro-batches of `size` pairs, on CPU."""
    parts = [pair_logps(model, mb) for mb in micro_batches(batch, size)]
    return torch.cat([c.cpu() for c, _ in parts]), torch.cat([r.cpu() for _, r in parts])


class DPOPolicyWorker(PolicyWorker):
    """One ZeRO-3 rank of the DPO policy; `micro_batch_size` counts pairs."""

    def forward_pair_logps(self, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
        """(chosen [b], rejected [b]) log-probs of this rank's shard under the current policy.

        Collective: every rank must call it with a shard of the same size.
        """
        self.engine.eval()
        return pair_logps_batched(self.engine, batch, self.spec.micro_batch_size)

    def dpo_step(
        self,
        batch: PreferenceBatch,
        ref_chosen: Tensor,
        ref_rejected: Tensor,
        beta: float,
        label_smoothing: float,
        loss_type: str,
    ) -> DPOStepStats:
        """One optimizer step over this rank's shard ([b] pairs, [b] reference log-probs).

        DeepSpeed accumulates the micro-batches' gradients (scaled by 1/grad_accum_steps) and
        steps the optimizer at the boundary, which the driver aligns with the end of the shard.
        """
        self.engine.train()
        m, stats = self.spec.micro_batch_size, []
        for i, mb in enumerate(micro_batches(batch, m)):
            chosen, rejected = pair_logps(self.engine, mb)
            ref = tuple(
                t[i * m : (i + 1) * m].to(chosen.device) for t in (ref_chosen, ref_rejected)
            )
            loss, s = dpo_loss(chosen, rejected, *ref, beta, label_smoothing, loss_type)
            check_finite(loss, f"DPO loss (rank {self.spec.rank})")
            self.engine.backward(loss)
            self.engine.step()
            stats.append(
                DPOStepStats(
                    loss=loss.item(),
                    reward_accuracy=s.reward_accuracy.item(),
                    chosen_reward=s.chosen_rewards.mean().item(),
                    rejected_reward=s.rejected_rewards.mean().item(),
                    margin=s.reward_margin.item(),
                )
            )
        return mean_dpo_stats(stats)


class DPOReferenceWorker(ReferenceWorker):
    """The frozen reference model, scoring preference pairs; `micro_batch_size` counts pairs."""

    def forward_pair_logps(self, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
        """(chosen [B], rejected [B]) reference log-probs."""
        return pair_logps_batched(self.model, batch, self.micro_batch_size)
