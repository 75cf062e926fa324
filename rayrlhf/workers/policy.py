"""Policy role: a DeepSpeed ZeRO-3 rank that recomputes logprobs, takes PPO steps, pushes weights.

All ranks run every method together (ZeRO-3 forwards and gathers are collective); the driver
hands each rank an equal shard of the batch. Only rank 0 talks to the engines.
"""

from __future__ import annotations

import math

import ray
import torch

from rayrlhf.algorithms.losses import ppo_policy_loss
from rayrlhf.algorithms.masked import masked_mean
from rayrlhf.cluster.collective import new_group
from rayrlhf.cluster.weight_sync import Fingerprint, ParamMeta, plan_buckets, send_broadcast
from rayrlhf.models.forward import response_logprobs
from rayrlhf.types import Experience, Rollout, SyncResult, TrainStats, micro_batches, timed
from rayrlhf.workers.deepspeed_role import DeepSpeedRole


def check_finite(value: torch.Tensor, what: str) -> None:
    """Stop with a clear error instead of training on NaN/inf."""
    if not torch.isfinite(value).all():
        raise FloatingPointError(
            f"{what} is not finite ({value.flatten()[:4].tolist()}...); "
            "stopping before the optimizer step corrupts the weights"
        )


def mean_stats(stats: list[TrainStats]) -> TrainStats:
    """Field-wise mean of per-micro-batch (or per-rank) stats."""
    n = max(len(stats), 1)
    return TrainStats(
        *(sum(getattr(s, f) for s in stats) / n for f in TrainStats.__dataclass_fields__)
    )


class PolicyWorker(DeepSpeedRole):
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
    def train_step(self, exp: Experience, clip_eps: float) -> TrainStats:
        """One pass of clipped-PPO updates over this rank's shard (gradient accumulation inside
        DeepSpeed: it steps the optimizer every `grad_accum_steps` micro-batches)."""
        self.engine.train()
        r = exp.action_mask.shape[1]
        stats = []
        for mb in micro_batches(exp, self.spec.micro_batch_size):
            logprobs, entropy = response_logprobs(
                self.engine, mb.sequences, mb.attention_mask, r, with_entropy=True
            )
            mask = mb.action_mask.to(logprobs.device)
            loss, s = ppo_policy_loss(
                logprobs,
                mb.old_logprobs.to(logprobs.device),
                mb.advantages.to(logprobs.device),
                mask,
                clip_eps,
            )
            check_finite(loss, f"policy loss (rank {self.spec.rank})")
            self.engine.backward(loss)
            self.engine.step()
            grad_norm = (
                self.engine.get_global_grad_norm()
                if self.engine.is_gradient_accumulation_boundary()
                else None
            )
            stats.append(
                TrainStats(
                    loss=loss.item(),
                    approx_kl=s.approx_kl.item(),
                    clipfrac=s.clipfrac.item(),
                    entropy=masked_mean(entropy.detach(), mask).item(),
                    grad_norm=float(grad_norm)
                    if grad_norm is not None and math.isfinite(grad_norm)
                    else 0.0,
                )
            )
        return mean_stats(stats)

    # ---- weight sync -------------------------------------------------------------------------

    def weights_to_store(self, bucket_mb: float) -> tuple[list, SyncResult] | None:
        """Object-store transport: gather buckets, `ray.put` each from rank 0. Collective."""
        refs, fp, n = [], Fingerprint(), 0
        for bucket in self.gathered_buckets(int(bucket_mb * 2**20)):
            if self.spec.rank == 0:
                for name, t in bucket:
                    fp.update(name, t)
                refs.append(ray.put(bucket))
                n += 1
        if self.spec.rank != 0:
            return None
        return refs, SyncResult(fp.hexdigest(), fp.num_bytes, fp.num_tensors, n)

    def sync_plan(self, bucket_mb: float) -> list[list[ParamMeta]]:
        """The bucket plan both ends of a broadcast sync follow."""
        return plan_buckets(self.param_metas(), int(bucket_mb * 2**20))

    def init_weight_group(self, host: str, port: int, world_size: int, backend: str) -> None:
        """Broadcast transport, rank 0 only: join the sync group as its rank 0."""
        self._sync_device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")
        self._sync_group = new_group(backend, host, port, 0, world_size)

    def broadcast_weights(self, bucket_mb: float) -> SyncResult | None:
        """Broadcast transport: gather buckets (all ranks), rank 0 broadcasts. Collective."""
        buckets = self.gathered_buckets(int(bucket_mb * 2**20))
        if self.spec.rank != 0:
            for _ in buckets:
                pass
            return None
        fp, n = send_broadcast(self._sync_group, buckets, self._sync_device)
        return SyncResult(fp.hexdigest(), fp.num_bytes, fp.num_tensors, n)

    def fingerprint(self, bucket_mb: float) -> str | None:
        """Fingerprint of the current full weights (rank 0; None elsewhere). Collective."""
        fp = Fingerprint()
        for bucket in self.gathered_buckets(int(bucket_mb * 2**20)):
            for name, t in bucket:
                fp.update(name, t)
        return fp.hexdigest() if self.spec.rank == 0 else None
