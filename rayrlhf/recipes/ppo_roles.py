"""The role groups of a run and the verbs the driver calls on them.

    policy   N DeepSpeed ZeRO-3 ranks      (PolicyWorker)
    critic   K DeepSpeed ZeRO-3 ranks      (CriticWorker)
    reference, reward                      (one actor each)
    engines  M vLLM engines                (RolloutEngine), M independent of N

Every remote wait is bounded by `TrainConfig.phase_timeout_s`, so a stuck actor is an error naming
the phase, not a silent hang.
"""

from __future__ import annotations

import os
import uuid
from collections import deque

import ray
import torch
from ray.util.placement_group import placement_group_table

from rayrlhf.cluster.actors import ActorSet
from rayrlhf.cluster.capacity import check_capacity, cluster_shape_from_ray
from rayrlhf.cluster.placement import address_and_port, threads_for
from rayrlhf.config import RankGroupConfig, TrainConfig
from rayrlhf.types import (
    Experience,
    LossNorm,
    Rollout,
    Sample,
    Scores,
    SyncResult,
    Timed,
    TrainStats,
    shard_rows,
)
from rayrlhf.weight_sync.collective import resolve_backend
from rayrlhf.weight_sync.records import segment_offsets
from rayrlhf.workers.critic import CriticWorker
from rayrlhf.workers.policy import PolicyWorker, mean_stats
from rayrlhf.workers.reference import ReferenceWorker
from rayrlhf.workers.reward import RewardWorker
from rayrlhf.workers.rollout import RolloutEngine, generate_on


def grad_accum_steps(cfg: TrainConfig, group: RankGroupConfig) -> int:
    """Micro-batches per optimizer step on each rank of `group`."""
    per_step = cfg.algorithm.rollout_batch_size // cfg.algorithm.num_mini_batches
    return per_step // (group.num_ranks * group.micro_batch_size)


def _shards(actors: list, batch) -> list[tuple]:
    """(actor, its equal row shard of `batch`) for each data-parallel rank of a role."""
    return list(zip(actors, shard_rows(batch, len(actors)))) if actors else []


def _busy(timer, **groups: list[Timed]) -> None:
    """Record each role's compute seconds in the step's timer (its slowest actor)."""
    if timer is not None:
        for role, results in groups.items():
            if results:  # a role with no actors (no critic) did no work
                timer.add_busy(role, max(r.seconds for r in results))


class Roles:
    """Handles to every actor of a run, created in their own placement groups. A failure while
    they start releases every actor already started."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.timeout = cfg.phase_timeout_s
        self._num_buckets: dict[float, int] = {}
        self._syncs = 0  # syncs so far: every `sync.verify_every`-th hashes the bytes
        self.actors = ActorSet(cfg.phase_timeout_s, cfg.placement_timeout_s)
        try:
            self._start(cfg)
        except BaseException:
            self.actors.shutdown()
            raise

    def _start(self, cfg: TrainConfig) -> None:
        # Fail in seconds, naming the role, rather than after placement_timeout_s.
        check_capacity(cfg, cluster_shape_from_ray())
        actors, seed = self.actors, cfg.seed
        self.policy = actors.start_zero3(
            "policy", PolicyWorker, cfg.policy, grad_accum_steps(cfg, cfg.policy), seed
        )
        crt = cfg.active_critic  # critic-free estimators: no actor, no resources reserved
        self.critic = (
            actors.start_zero3("critic", CriticWorker, crt, grad_accum_steps(cfg, crt), seed)
            if crt
            else []
        )
        ref, rw, ro = cfg.reference, cfg.reward, cfg.rollout
        self.reference = actors.start_one(
            "reference", ReferenceWorker, ref.resources, ref.model_path or cfg.policy.model_path,
            ref.micro_batch_size, threads_for(ref.resources),
        )  # fmt: skip
        self.reward = actors.start_one(
            "reward", RewardWorker, rw.resources, rw.model_path, rw.rule, rw.micro_batch_size,
            threads_for(rw.resources),
        )  # fmt: skip
        self.engines = actors.start(
            "rollout", RolloutEngine, ro.resources, ro.num_engines,
            lambda i: (cfg.policy.model_path, ro, seed, i),
        )  # fmt: skip
        actors.wait_ready()
        self.transport = self._resolve_transport()
        if self.transport == "shared_memory":
            self.open_segment()
        elif self.transport == "broadcast":
            self._init_broadcast_group()

    def all_actors(self) -> list:
        return self.actors.all()

    def get(self, refs, phase: str):
        """`ray.get` bounded by the phase timeout, with an error that names the phase."""
        return self.actors.get(refs, phase)

    def _nodes(self, *roles: str) -> set[str]:
        """The Ray nodes that `roles`' reserved bundles are on."""
        tables = [placement_group_table(self.actors.groups[r]) for r in roles]
        return {node for t in tables for node in t["bundles_to_node_id"].values()}

    def _resolve_transport(self) -> str:
        """`sync.transport`, with 'auto' made concrete: shared memory when the policy ranks and
        the engines share one node and its /dev/shm has room for the segment, else the object
        store."""
        wanted = self.cfg.sync.transport
        if wanted not in ("auto", "shared_memory"):
            return wanted
        nodes = self._nodes("policy", "rollout")
        if len(nodes) > 1:
            if wanted == "auto":
                return "object_store"
            raise ValueError(
                f"sync.transport=shared_memory needs the policy ranks and the engines on one "
                f"node; they are on {len(nodes)}. Use auto or object_store"
            )
        metas = self.get(self.policy[0].param_metas.remote(), "sync set-up")
        need = segment_offsets(metas)[1]
        free = self.get(self.policy[0].free_shared_memory.remote(), "sync set-up")
        if wanted == "auto" and free < 2 * need:  # leave room for Ray's object store
            print(
                f"rayrlhf: weight sync through the object store: /dev/shm has {free / 2**30:.1f} "
                f"GiB free, short of twice the {need / 2**30:.1f} GiB segment",
                flush=True,
            )
            return "object_store"
        return "shared_memory"

    def open_segment(self) -> None:
        """Map one shared segment, the size of the policy's weights, into every policy rank and
        engine (one node), then unlink its name: the memory goes when the last process that
        maps it exits, however the run ends."""
        path = os.path.join("/dev/shm", f"rayrlhf-weights-{uuid.uuid4().hex[:16]}")
        metas = self.get(self.policy[0].param_metas.remote(), "sync set-up")
        self.get(self.policy[0].open_segment.remote(path, create=True), "sync set-up")
        try:
            opens = [p.open_segment.remote(path) for p in self.policy[1:]]
            opens += [e.open_segment.remote(path, metas) for e in self.engines]
            self.get(opens, "sync set-up")
        finally:
            self.get(self.policy[0].unlink_segment.remote(), "sync set-up")

    def _init_broadcast_group(self) -> None:
        backend = resolve_backend(self.cfg.sync.backend)
        if backend == "nccl" and not self.cfg.rollout.resources.num_gpus:
            raise ValueError("sync.backend nccl needs GPU engines (rollout.resources.num_gpus)")
        plan = self.get(self.policy[0].sync_plan.remote(self.cfg.sync.bucket_mb), "sync plan")
        host, port = self.get(address_and_port.remote(), "sync group address")
        sizes = self.get([e.num_workers.remote() for e in self.engines], "sync group")
        world, offsets = 1 + sum(sizes), [1 + sum(sizes[:i]) for i in range(len(sizes))]
        joins = [self.policy[0].init_weight_group.remote(host, port, world, backend)]
        joins += [
            e.init_weight_group.remote(host, port, off, world, backend, plan)
            for e, off in zip(self.engines, offsets)
        ]
        self.get(joins, "sync group")

    # ---- the verbs of a step --------------------------------------------------------------

    def generate(
        self, prompt_ids: list[list[int]], seed: int, greedy: bool = False, timer=None
    ) -> list[Sample]:
        """Split the prompts evenly over the engines; results keep the prompts' order."""
        parts = generate_on(self.engines, prompt_ids, seed, self.get, greedy)
        _busy(timer, generate=parts)
        return [s for part in parts for s in part.value]

    def score(self, rollout: Rollout, timer=None) -> Scores:
        """Reward, reference logprobs, old policy logprobs and values, all concurrently."""
        ref = ray.put(rollout)
        pol = [a.forward_logprobs.remote(s) for a, s in _shards(self.policy, rollout)]
        crt = [a.forward_values.remote(s) for a, s in _shards(self.critic, rollout)]
        rew, ref_lp = self.reward.score.remote(ref), self.reference.forward_logprobs.remote(ref)
        out = self.get([rew, ref_lp, *pol, *crt], "score")
        n = len(self.policy)
        _busy(
            timer,
            reward=out[:1],
            reference=out[1:2],
            old_logprobs=out[2 : 2 + n],
            critic=out[2 + n :],
        )
        values = [o.value for o in out]
        return Scores(
            rewards=values[0],
            ref_logprobs=values[1],
            old_logprobs=torch.cat(values[2 : 2 + n]),
            values=torch.cat(values[2 + n :]) if crt else torch.zeros_like(rollout.action_mask),
        )

    def train(
        self, exp: Experience, kl_coef: float, norms: list[LossNorm], timer=None
    ) -> tuple[TrainStats, TrainStats]:
        """Policy and critic updates, concurrently; stats averaged over ranks and epochs."""
        algo, pol, crt = self.cfg.algorithm, [], []
        for _ in range(algo.ppo_epochs):
            p = [a.train_step.remote(s, algo, kl_coef, norms) for a, s in _shards(self.policy, exp)]
            c = [a.train_step.remote(s, algo.value_clip_eps) for a, s in _shards(self.critic, exp)]
            out = self.get(p + c, "train")
            _busy(timer, train_policy=out[: len(p)], train_critic=out[len(p) :])
            pol += [o.value for o in out[: len(p)]]
            crt += [o.value for o in out[len(p) :]]
        return mean_stats(pol), mean_stats(crt) if crt else TrainStats(loss=0.0)

    def sync_weights(
        self,
        bucket_mb: float | None = None,
        max_in_flight: int | None = None,
        gather: bool = False,
        hash_bytes: bool | None = None,
        transport: str | None = None,
    ) -> SyncResult:
        """Push the policy's new weights into every engine and verify them there: the bytes on
        the first and every `sync.verify_every`-th sync, names, dtypes, shapes and sizes always.

        The arguments are for the benchmark's baselines and ablations (see `sync_streamed`):
        `transport` may pick the object store over shared memory; the broadcast's bucket plan is
        fixed at start-up.
        """
        sync = self.cfg.sync
        mb = bucket_mb or sync.bucket_mb
        if hash_bytes is None:
            hash_bytes = self._syncs % sync.verify_every == 0
        self._syncs += 1
        transport = transport or self.transport
        if transport == "broadcast":
            calls = [a.broadcast_weights.remote(mb, hash_bytes) for a in self.policy]
            calls += [e.receive_weights.remote(hash_bytes) for e in self.engines]
            return self.get(calls, "sync")[0]
        ahead = sync.max_in_flight if max_in_flight is None else max_in_flight
        return self.sync_streamed(mb, ahead, gather, hash_bytes, transport == "shared_memory")

    def sync_streamed(
        self,
        bucket_mb: float,
        max_in_flight: int,
        gather: bool = False,
        hash_bytes: bool = True,
        segment: bool = False,
    ) -> SyncResult:
        """Stream buckets: every rank sends its partition of bucket k, into the shared `segment`
        or the object store, and every engine loads it as soon as all pieces are there, while
        the ranks send k+1; at most `max_in_flight` buckets run ahead of the engines' loads.
        Peers' per-parameter sync is one parameter per bucket, `max_in_flight` 0 and `gather`
        (rank 0 gathers and puts each parameter; always through the object store)."""
        if bucket_mb not in self._num_buckets:
            n = self.get(self.policy[0].num_buckets.remote(bucket_mb), "sync")
            self._num_buckets[bucket_mb] = n
        segment = segment and not gather
        pending: deque[list] = deque()
        for k in range(self._num_buckets[bucket_mb]):
            put = [
                a.put_bucket.remote(k, bucket_mb, gather, hash_bytes, segment) for a in self.policy
            ]
            load = [
                (e.load_segment_bucket if segment else e.load_bucket).remote(k, hash_bytes, *put)
                for e in self.engines
            ]
            pending.append(put + load)
            while len(pending) > max_in_flight:
                self.get(pending.popleft(), "sync")
        for refs in pending:
            self.get(refs, "sync")
        rank0, others = self.policy[0], self.policy[1:]
        sent = rank0.sync_result.remote(*[a.sent_records.remote() for a in others])
        self.get([e.finish_load.remote(sent) for e in self.engines], "sync")
        return self.get(sent, "sync")

    def policy_fingerprint(self, parts: int = 1) -> str:
        """What a sync must deliver: the fingerprint of the policy's current weights, each tensor
        whole (`parts` 1) or in the pieces `parts` ranks send. Gathers every bucket."""
        calls = [a.fingerprint.remote(self.cfg.sync.bucket_mb, parts) for a in self.policy]
        return self.get(calls, "fingerprint")[0]

    def save_policy(self, path: str) -> None:
        self.get([a.save.remote(path) for a in self.policy], "save")

    def shutdown(self) -> None:
        """Kill every actor and release the role groups' reservations."""
        self.actors.shutdown()
