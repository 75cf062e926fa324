"""Policy role: a DeepSpeed ZeRO-3 rank that recomputes logprobs, takes PPO steps, pushes weights.

All ranks run every method together (ZeRO-3 forwards and gathers are collective); the driver
hands each rank an equal shard of the batch. In the shared-memory and object-store syncs every
rank sends its own partition to the engines; in the broadcast sync only rank 0 talks to them.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from rayrlhf.algorithms.experience import update_gives_old_logprobs
from rayrlhf.algorithms.kl import kl_loss_term
from rayrlhf.algorithms.losses import Aggregation, entropy_bonus, ppo_policy_loss
from rayrlhf.algorithms.masked import masked_mean
from rayrlhf.config import AlgorithmConfig
from rayrlhf.models.forward import response_logprobs
from rayrlhf.types import (
    Experience,
    LossNorm,
    PolicyUpdate,
    Rollout,
    TrainStats,
    micro_batches,
    timed,
)
from rayrlhf.weight_sync.trainer_end import WeightSender
from rayrlhf.workers.deepspeed_role import DeepSpeedRole, StepOutcome


def check_finite(value: torch.Tensor, what: str) -> None:
    """Stop with a clear error instead of training on NaN/inf (the offline trainers; PPO's
    policy and critic skip such a step instead: `DeepSpeedRole.backward_step`)."""
    if not torch.isfinite(value).all():
        raise FloatingPointError(
            f"{what} is not finite ({value.flatten()[:4].tolist()}...); "
            "stopping before the optimizer step corrupts the weights"
        )


def mean_stats(stats: list[TrainStats]) -> TrainStats:
    """Field-wise mean of per-micro-batch (or per-rank) stats; the longest skip streak."""
    n = max(len(stats), 1)
    mean = {f: sum(getattr(s, f) for s in stats) / n for f in TrainStats.__dataclass_fields__}
    return TrainStats(**{**mean, "skip_streak": max((s.skip_streak for s in stats), default=0.0)})


class PolicyWorker(DeepSpeedRole, WeightSender):
    """One rank of the policy trainer."""

    MODEL_KIND = "causal_lm"

    @timed
    @torch.no_grad()
    def forward_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """[b, R] logprobs of this rank's shard of the rollout under the current policy."""
        self.engine.eval()
        r = rollout.action_mask.shape[1]
        out = [
            response_logprobs(self.engine, mb.sequences, mb.attention_mask, r)[0].cpu()
            for mb in micro_batches(rollout, self.spec.micro_batch_size)
        ]
        return torch.cat(out) * rollout.action_mask

    @timed
    def train_step(
        self, exp: Experience, algo: AlgorithmConfig, kl_coef: float, norms: list[LossNorm]
    ) -> PolicyUpdate:
        """One pass over this rank's shard: `norms[k]` normalises optimizer step k (DeepSpeed
        accumulates `grad_accum_steps` micro-batches per step). Without `exp.old_logprobs` (one
        on-policy pass) each micro-batch's forward, detached, is its own old logprobs, and they
        come back ([b, R], padding not masked) for the step's KL and engine-agreement figures."""
        own_old = exp.old_logprobs is None
        if own_old and not update_gives_old_logprobs(algo):
            raise ValueError("old logprobs are needed for more than one pass over the batch")
        self.engine.train()
        accum, stats, seen = self.spec.grad_accum_steps, [], []
        # DeepSpeed divides by the accumulation steps and averages gradients over ranks; undo
        # both so the step's gradient is that of the global aggregate (see `LossNorm`).
        scale, outcomes = accum * self.spec.world_size, []
        for i, mb in enumerate(micro_batches(exp, self.spec.micro_batch_size)):
            loss, s, logprobs = self._policy_loss(mb, algo, kl_coef, norms[i // accum])
            outcomes.append(self.backward_step(loss * scale))  # non-finite: step skipped
            stats.append(replace(s, loss=loss.item() * scale))
            seen.append(logprobs.cpu())
        stats = replace(mean_stats(stats), **StepOutcome.fields(outcomes))
        return PolicyUpdate(stats, torch.cat(seen) if own_old else None)

    def _policy_loss(
        self, mb: Experience, algo: AlgorithmConfig, kl_coef: float, norm: LossNorm
    ) -> tuple[torch.Tensor, TrainStats, torch.Tensor]:
        """Clipped PPO surrogate (+ KL term in kl_mode 'loss', - entropy bonus) of a micro-batch,
        its stats and its logprobs (detached)."""
        logprobs, entropy = response_logprobs(
            self.engine, mb.sequences, mb.attention_mask, mb.action_mask.shape[1], with_entropy=True
        )
        dev = logprobs.device
        mask = mb.action_mask.to(dev)
        agg = Aggregation(algo.loss_aggregation, norm)
        old = logprobs.detach() if mb.old_logprobs is None else mb.old_logprobs.to(dev)
        loss, s = ppo_policy_loss(
            logprobs,
            old,
            mb.advantages.to(dev),
            mask,
            algo.clip_eps,
            dual_clip=algo.dual_clip,
            agg=agg,
        )
        if algo.kl_mode == "loss" and kl_coef:
            ref = mb.ref_logprobs.to(dev)
            loss = loss + kl_coef * kl_loss_term(logprobs, ref, mask, algo.kl_estimator, agg=agg)
        if algo.entropy_coef:
            loss = loss - algo.entropy_coef * entropy_bonus(entropy, mask, agg)
        stats = TrainStats(
            loss=0.0,
            approx_kl=s.approx_kl.item(),
            clipfrac=s.clipfrac.item(),
            entropy=masked_mean(entropy.detach(), mask).item(),
        )
        return loss, stats, logprobs.detach()
