"""Preference roles: a ZeRO-3 policy rank that takes preference-loss steps, and the frozen
reference that scores pairs.

Both sides of a pair run in one forward pass (`PreferenceBatch.stacked`, chosen rows first), so
each ZeRO-3 parameter gather serves 2 x micro_batch_size sequences. A side's log-probability is
the sum of its response tokens' log-probs (`sequence_logps`), EOS included; the losses that
normalise by length (ORPO, SimPO) divide by the response's token count, and ORPO's SFT term is
the chosen side of the same pass. KTO rows come in the same layout (`rayrlhf.data.kto`): the
row's completion first, then the mismatched completion whose log-ratio estimates the KL.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rayrlhf.algorithms.preference import (
    LossParams,
    PreferenceLoss,
    PreferenceScores,
    PreferenceStats,
    kto_kl_estimate,
    preference_loss_entry,
    sequence_logps,
)
from rayrlhf.data.preferences import PreferenceBatch, PreferenceSet
from rayrlhf.models.forward import response_logprobs
from rayrlhf.types import micro_batches
from rayrlhf.workers.policy import PolicyWorker, check_finite
from rayrlhf.workers.reference import ReferenceWorker


@dataclass(frozen=True)
class DPOStepStats:
    """Means over one rank's micro-batches of one step (rewards: the loss's own, see
    `PreferenceStats`)."""

    loss: float
    reward_accuracy: float
    """Fraction of pairs whose chosen reward beats the rejected one (KTO: of rows on their
    label's side of the reference point)."""
    chosen_reward: float
    rejected_reward: float
    margin: float
    """Mean of chosen minus rejected reward."""
    nll: float | None = None
    """ORPO: the SFT term (per-token NLL of the chosen responses)."""
    kl: float | None = None
    """KTO: the reference point z0."""

    @staticmethod
    def of(loss: Tensor, s: PreferenceStats) -> DPOStepStats:
        """The floats of one micro-batch's loss and stats."""
        values = {f.name: getattr(s, f.name) for f in fields(PreferenceStats)}
        return DPOStepStats(
            loss.item(), **{k: v.item() for k, v in values.items() if v is not None}
        )


def mean_dpo_stats(stats: list[DPOStepStats]) -> DPOStepStats:
    """Field-wise mean (over micro-batches, or over equally sized rank shards); a field that is
    None stays None."""
    n = max(len(stats), 1)
    out = {}
    for f in fields(DPOStepStats):
        values = [getattr(s, f.name) for s in stats]
        out[f.name] = None if values and values[0] is None else sum(values) / n
    return DPOStepStats(**out)


@dataclass(frozen=True)
class PairLogps:
    """Sequence log-probs of every pair of a set (KTO: completion, mismatched), by row."""

    chosen: Tensor
    """[N] float32."""
    rejected: Tensor
    """[N] float32."""


@dataclass(frozen=True)
class PreferenceStepBatch(PreferenceBatch):
    """A step's pairs (or KTO rows) with what the loss reads besides the policy's log-probs."""

    ref_chosen: Tensor
    """[B] float32 cached reference log-probs of the first side (0 for a reference-free loss)."""
    ref_rejected: Tensor
    """[B] float32, of the second side."""
    desirable: Tensor
    """[B] bool: KTO's labels (all True for pairs)."""


def step_batch(
    batch: PreferenceBatch, ref: PairLogps | None, desirable: Tensor | None
) -> PreferenceStepBatch:
    """`batch` with its rows' reference log-probs (or zeros) and labels (or all True)."""
    zeros = torch.zeros(len(batch))
    return PreferenceStepBatch(
        **{f.name: getattr(batch, f.name) for f in fields(PreferenceBatch)},
        ref_chosen=ref.chosen if ref is not None else zeros,
        ref_rejected=ref.rejected if ref is not None else zeros,
        desirable=desirable if desirable is not None else torch.ones(len(batch), dtype=torch.bool),
    )


@dataclass(frozen=True)
class EvalStats:
    """The loss's implicit-reward statistics on held-out pairs (KTO: rows)."""

    reward_accuracy: float
    """Pairs: fraction whose reward is higher for chosen than for rejected. KTO: fraction of
    rows whose reward lies on their label's side of the reference point."""
    margin: float
    """Mean reward margin, chosen (desirable) minus rejected (undesirable)."""
    pairs: int
    """Held-out pairs (KTO: rows)."""


def set_scores(
    rows: PreferenceSet, policy: PairLogps, ref: PairLogps | None, desirable: Tensor | None
) -> PreferenceScores:
    """The scores of a whole scored set, for the loss's statistics."""
    chosen_tokens, rejected_tokens = rows.response_tokens()
    return PreferenceScores(
        policy.chosen,
        policy.rejected,
        chosen_tokens,
        rejected_tokens,
        ref_chosen=None if ref is None else ref.chosen,
        ref_rejected=None if ref is None else ref.rejected,
        desirable=desirable,
    )


@torch.no_grad()
def preference_eval(loss: str, params: LossParams, scores: PreferenceScores) -> EvalStats:
    """Held-out accuracy and margin of the loss's own implicit reward (KTO: its reference point
    estimated from the held-out rows' mismatched completions)."""
    _, s = preference_loss_entry(loss).fn(scores, params)
    return EvalStats(s.reward_accuracy.item(), s.margin.item(), len(scores.chosen))


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


def batch_scores(model: nn.Module, mb: PreferenceStepBatch, loss: PreferenceLoss):
    """The policy's `PreferenceScores` of a micro-batch (one forward pass, with gradients).

    KTO's KL estimate is averaged over the ranks (every rank calls this in step), so z0 rests on
    all ranks' mismatched rows rather than one micro-batch's."""
    chosen, rejected = pair_logps(model, mb)
    dev = chosen.device
    scores = PreferenceScores(
        chosen,
        rejected,
        mb.chosen_action_mask.sum(1).to(dev),
        mb.rejected_action_mask.sum(1).to(dev),
    )
    if loss.uses_reference:
        scores = replace(
            scores, ref_chosen=mb.ref_chosen.to(dev), ref_rejected=mb.ref_rejected.to(dev)
        )
    if loss.unpaired:
        kl = kto_kl_estimate(rejected, scores.ref_rejected)
        scores = replace(scores, desirable=mb.desirable.to(dev), kl=_mean_over_ranks(kl))
    return scores


def _mean_over_ranks(x: Tensor) -> Tensor:
    """The mean of a 0-dim tensor over the data-parallel ranks (itself without a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    total = x.clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


class DPOPolicyWorker(PolicyWorker):
    """One ZeRO-3 rank of the preference-trained policy; `micro_batch_size` counts pairs."""

    def forward_pair_logps(self, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
        """(chosen [b], rejected [b]) log-probs of this rank's shard under the current policy.

        Collective: every rank must call it with a shard of the same size.
        """
        self.engine.eval()
        return pair_logps_batched(self.engine, batch, self.spec.micro_batch_size)

    def preference_step(
        self, batch: PreferenceStepBatch, loss: str, params: LossParams
    ) -> DPOStepStats:
        """One optimizer step of `loss` over this rank's shard of [b] pairs (or KTO rows).

        DeepSpeed accumulates the micro-batches' gradients (scaled by 1/grad_accum_steps) and
        steps the optimizer at the boundary, which the driver aligns with the end of the shard.
        """
        self.engine.train()
        entry, stats = preference_loss_entry(loss), []
        for mb in micro_batches(batch, self.spec.micro_batch_size):
            value, s = entry.fn(batch_scores(self.engine, mb, entry), params)
            check_finite(value, f"{loss} loss (rank {self.spec.rank})")
            self.engine.backward(value)
            self.engine.step()
            stats.append(DPOStepStats.of(value, s))
        return mean_dpo_stats(stats)


class DPOReferenceWorker(ReferenceWorker):
    """The frozen reference model, scoring preference pairs; `micro_batch_size` counts pairs."""

    def forward_pair_logps(self, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
        """(chosen [B], rejected [B]) reference log-probs."""
        return pair_logps_batched(self.model, batch, self.micro_batch_size)
