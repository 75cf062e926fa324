"""Policy role: a DeepSpeed ZeRO-3 rank that recomputes logprobs, takes PPO steps, pushes weights.

All ranks run every method together (ZeRO-3 forwards and gathers are collective); the driver
hands each rank an equal shard of the batch. In the shared-memory and object-store syncs every
rank sends its own partition to the engines; in the broadcast sync only rank 0 talks to them.
"""

from __future__ import annotations

import math
from dataclasses import replace

import ray
import torch

from rayrlhf.algorithms.kl import kl_loss_term
from rayrlhf.algorithms.losses import entropy_bonus, ppo_policy_loss
from rayrlhf.algorithms.masked import masked_mean
from rayrlhf.config import AlgorithmConfig
from rayrlhf.models.forward import response_logprobs
from rayrlhf.types import (
    Experience,
    LossNorm,
    Rollout,
    SyncResult,
    TrainStats,
    micro_batches,
    timed,
)
from rayrlhf.weight_sync.collective import new_group
from rayrlhf.weight_sync.records import (
    Fingerprint,
    ParamMeta,
    PieceRecord,
    SegmentBucket,
    SharedSegment,
    digest,
    dtype_name,
    raw_bytes,
    segment_offsets,
    segment_write,
    send_broadcast,
    shared_memory_free,
    to_wire,
)
from rayrlhf.workers.deepspeed_role import DeepSpeedRole


def check_finite(value: torch.Tensor, what: str) -> None:
    """Stop with a clear error instead of training on NaN/inf."""
    if not torch.isfinite(value).all():
        raise FloatingPointError(
            f"{what} is not finite ({value.flatten()[:4].tolist()}...); "
            "stopping before the optimizer step corrupts the weights"
        )


def _normalisers(mode: str, norm: LossNorm) -> dict[str, float]:
    """The global normaliser(s) that `mode` divides by."""
    if mode == "token_mean":
        return {"num_tokens_global": norm.tokens}
    if mode == "seq_mean_token_sum":
        return {"num_seqs_global": norm.sequences, "max_len": norm.max_len}
    return {"num_seqs_global": norm.sequences}


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
    def train_step(
        self, exp: Experience, algo: AlgorithmConfig, kl_coef: float, norms: list[LossNorm]
    ) -> TrainStats:
        """One pass over this rank's shard: `norms[k]` normalises optimizer step k (DeepSpeed
        accumulates `grad_accum_steps` micro-batches per step)."""
        self.engine.train()
        accum, stats = self.spec.grad_accum_steps, []
        # DeepSpeed divides by the accumulation steps and averages gradients over ranks; undo
        # both so the step's gradient is that of the global aggregate (see `LossNorm`).
        scale = accum * self.spec.world_size
        for i, mb in enumerate(micro_batches(exp, self.spec.micro_batch_size)):
            loss, s = self._policy_loss(mb, algo, kl_coef, norms[i // accum])
            check_finite(loss, f"policy loss (rank {self.spec.rank})")
            self.engine.backward(loss * scale)
            self.engine.step()
            stats.append(replace(s, loss=loss.item() * scale, grad_norm=self._grad_norm()))
        return mean_stats(stats)

    def _policy_loss(
        self, mb: Experience, algo: AlgorithmConfig, kl_coef: float, norm: LossNorm
    ) -> tuple[torch.Tensor, TrainStats]:
        """Clipped PPO surrogate (+ KL term in kl_mode 'loss', - entropy bonus) of a micro-batch."""
        logprobs, entropy = response_logprobs(
            self.engine, mb.sequences, mb.attention_mask, mb.action_mask.shape[1], with_entropy=True
        )
        dev = logprobs.device
        mask = mb.action_mask.to(dev)
        agg = {"aggregation": algo.loss_aggregation, **_normalisers(algo.loss_aggregation, norm)}
        loss, s = ppo_policy_loss(
            logprobs,
            mb.old_logprobs.to(dev),
            mb.advantages.to(dev),
            mask,
            algo.clip_eps,
            dual_clip=algo.dual_clip,
            **agg,
        )
        if algo.kl_mode == "loss" and kl_coef:
            ref = mb.ref_logprobs.to(dev)
            loss = loss + kl_coef * kl_loss_term(logprobs, ref, mask, algo.kl_estimator, **agg)
        if algo.entropy_coef:
            loss = loss - algo.entropy_coef * entropy_bonus(entropy, mask, **agg)
        return loss, TrainStats(
            loss=0.0,
            approx_kl=s.approx_kl.item(),
            clipfrac=s.clipfrac.item(),
            entropy=masked_mean(entropy.detach(), mask).item(),
        )

    def _grad_norm(self) -> float:
        """Global gradient norm of the last optimizer step (0 between steps)."""
        if not self.engine.is_gradient_accumulation_boundary():
            return 0.0
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None and math.isfinite(norm) else 0.0

    # ---- weight sync -------------------------------------------------------------------------

    def num_buckets(self, bucket_mb: float) -> int:
        return len(self.bucket_plan(int(bucket_mb * 2**20)))

    def free_shared_memory(self) -> int:
        """Bytes free in this node's /dev/shm, where a shared-memory sync's segment goes."""
        return shared_memory_free()

    def open_segment(self, path: str, create: bool = False) -> None:
        """Shared-memory transport: map the node's weight segment (rank 0 creates it)."""
        self._offsets, nbytes = segment_offsets(self.param_metas())
        self._segment = SharedSegment(path, nbytes, create)

    def unlink_segment(self) -> None:
        """Once every rank and engine has mapped the segment: remove its name from /dev/shm."""
        self._segment.unlink()

    def put_bucket(
        self,
        index: int,
        bucket_mb: float,
        gather: bool = False,
        hash_bytes: bool = True,
        segment: bool = False,
    ) -> list | None:
        """Every rank: hash this rank's ZeRO-3 partition of bucket `index`, straight from
        DeepSpeed's buffer (no collective), and send it: `segment`, copy it into the node's
        shared segment where the joined tensors live and return what was written
        (`SegmentBucket`); else `ray.put` it for the engines to join, and return [ref] (in a
        list, so that an engine given this call's result receives the ref, not the tensors).
        `gather` is peers' way, kept as the benchmark's baseline: gather the full parameters
        (collective) and rank 0 alone puts them; None on the ranks that put nothing."""
        metas = self.bucket_plan(int(bucket_mb * 2**20))[index]
        if index == 0:
            self._sent: list[PieceRecord] = []
            self._sent_buckets = 0
            self._hashed = hash_bytes
        if segment:
            return self._write(self.local_pieces(metas), metas)
        if not gather:
            return self._put(self.local_pieces(metas), metas)
        with self.gathered(metas) as bucket:
            return self._put(bucket, metas)

    def _record(
        self, pieces: list[tuple[str, torch.Tensor]], metas: list[ParamMeta]
    ) -> list[tuple[str, torch.Tensor]]:
        """Record the pieces as sent (hashed unless this sync skips it); returns them on the
        host (GPU: one copy, for both uses)."""
        pieces = [(name, t.detach().cpu()) for name, t in pieces]
        for (name, t), m in zip(pieces, metas):
            raw = raw_bytes(t)
            hashed = digest(raw) if self._hashed else b""
            self._sent.append((name, dtype_name(m.dtype), m.shape, hashed, raw.nbytes))
        self._sent_buckets += 1
        return pieces

    def _put(self, pieces: list[tuple[str, torch.Tensor]], metas: list[ParamMeta]) -> list | None:
        if not pieces:
            return None
        pieces = self._record(pieces, metas)
        return [ray.put(to_wire(pieces, [m.shape for m in metas]))]

    def _write(
        self, pieces: list[tuple[str, torch.Tensor]], metas: list[ParamMeta]
    ) -> SegmentBucket:
        pieces = self._record(pieces, metas)
        rank, world = self.spec.rank, self.spec.world_size
        return segment_write(self._segment, self._offsets, pieces, metas, rank, world)

    def sent_records(self) -> list[PieceRecord]:
        """What this rank's `put_bucket` calls since index 0 sent."""
        return self._sent

    def sync_result(self, *other_ranks: list[PieceRecord]) -> SyncResult:
        """Rank 0, given the other ranks' `sent_records`: what the sync sent, as a whole."""
        fp = Fingerprint.combine([self._sent, *other_ranks])
        return SyncResult(
            fp.hexdigest(), fp.num_bytes, fp.num_tensors, self._sent_buckets, self._hashed
        )

    def sync_plan(self, bucket_mb: float) -> list[list[ParamMeta]]:
        """The bucket plan both ends of a broadcast sync follow."""
        return self.bucket_plan(int(bucket_mb * 2**20))

    def init_weight_group(self, host: str, port: int, world_size: int, backend: str) -> None:
        """Broadcast transport, rank 0 only: join the sync group as its rank 0."""
        self._sync_device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")
        self._sync_group = new_group(backend, host, port, 0, world_size)

    def broadcast_weights(self, bucket_mb: float, hash_bytes: bool = True) -> SyncResult | None:
        """Broadcast transport: gather buckets (all ranks), rank 0 broadcasts. Collective."""
        buckets = self.gathered_buckets(int(bucket_mb * 2**20))
        if self.spec.rank != 0:
            for _ in buckets:
                pass
            return None
        fp, n = send_broadcast(self._sync_group, buckets, self._sync_device, hash_bytes)
        return SyncResult(fp.hexdigest(), fp.num_bytes, fp.num_tensors, n, hash_bytes)

    def fingerprint(self, bucket_mb: float, parts: int = 1) -> str | None:
        """Fingerprint of the current full weights as a sync sends them: each tensor whole
        (`parts` 1: the broadcast, or gathered buckets) or in the ranks' pieces (`parts` =
        world size). Rank 0; None elsewhere. Collective."""
        fp = Fingerprint()
        for bucket in self.gathered_buckets(int(bucket_mb * 2**20)):
            for name, t in bucket:
                fp.update(name, t, parts)
        return fp.hexdigest() if self.spec.rank == 0 else None
