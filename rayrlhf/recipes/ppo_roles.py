"""The role groups of a run and the verbs the driver calls on them.

    policy   N DeepSpeed ZeRO-3 ranks      (PolicyWorker)
    critic   K DeepSpeed ZeRO-3 ranks      (CriticWorker)
    reference, reward                      (one actor each)
    judge    vLLM engines of reward.judge  (JudgeEngine), called by the reward actor
    engines  M vLLM engines                (RolloutEngine), M independent of N

Every remote wait is bounded by a limit that adapts to the phase's measured time (`fault.hang_*`,
never over `phase_timeout_s`), and a dead, hung or raising actor is a `RoleFailed` naming its
role, rank and phase, not a silent hang or a raw Ray traceback.
"""

from __future__ import annotations

import ray
import torch

from rayrlhf.algorithms.experience import update_gives_old_logprobs
from rayrlhf.cluster.actors import ActorSet
from rayrlhf.cluster.capacity import check_capacity, cluster_shape_from_ray
from rayrlhf.cluster.placement import threads_for
from rayrlhf.cluster.waits import HangLimits
from rayrlhf.config import RankGroupConfig, TrainConfig
from rayrlhf.runtime.engine_pool import EnginePool
from rayrlhf.types import (
    Experience,
    LossNorm,
    RewardOutput,
    Rollout,
    Sample,
    Scores,
    StepUpdate,
    SyncResult,
    Timed,
    TrainStats,
    shard_rows,
)
from rayrlhf.weight_sync.driver import WeightSync
from rayrlhf.workers.critic import CriticWorker
from rayrlhf.workers.judge import start_judges
from rayrlhf.workers.policy import PolicyWorker, mean_stats
from rayrlhf.workers.reference import ReferenceWorker
from rayrlhf.workers.reward import RewardWorker
from rayrlhf.workers.rollout import RolloutEngine


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

    def __init__(self, cfg: TrainConfig, engine_restarts: int = 0) -> None:
        self.cfg = cfg
        self.engine_restarts = engine_restarts  # carried over when the driver rebuilds them
        self.timeout = cfg.phase_timeout_s
        f = cfg.fault  # phases' limits adapt to their measured times (a hang in ~a minute)
        hangs = HangLimits(cfg.phase_timeout_s, f.hang_factor, f.hang_min_s, f.hang_warmup)
        self.actors = ActorSet(cfg.phase_timeout_s, cfg.placement_timeout_s, hangs)
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
        judges = start_judges(actors, rw.judge, seed) if rw.judge else None  # its own group
        self.reward = actors.start_one(
            "reward", RewardWorker, rw.resources, rw, threads_for(rw.resources),
            cfg.policy.model_path, judges,
        )  # fmt: skip
        self.pool = EnginePool(
            actors, RolloutEngine, ro, lambda i: (cfg.policy.model_path, ro, seed, i),
            cfg.fault.max_engine_restarts, self.engine_restarts,
        )  # fmt: skip
        actors.wait_ready()
        self.sync = WeightSync(
            self.policy, self.pool.live, cfg.sync, self.get, actors.nodes("policy", "rollout"),
            policy_gpus=cfg.policy.resources.num_gpus, engine_gpus=ro.resources.num_gpus,
        )  # fmt: skip
        self.pool.attach(self.sync)

    @property
    def engines(self) -> list:
        """The engines that serve now (`EnginePool.live`)."""
        return self.pool.live

    def all_actors(self) -> list:
        return self.actors.all()

    def get(self, refs, phase: str):
        """`ray.get` bounded by the phase timeout, with an error that names the phase."""
        return self.actors.get(refs, phase)

    @property
    def transport(self) -> str:
        """The weight-sync transport in use, 'auto' resolved."""
        return self.sync.transport

    # ---- the verbs of a step --------------------------------------------------------------

    def generate(
        self, prompt_ids: list[list[int]], seed: int, greedy: bool = False, timer=None
    ) -> list[Sample]:
        """Split the prompts evenly over the engines; results keep the prompts' order. A lost
        engine's rows are generated again by the others (`EnginePool.generate`)."""
        parts = self.pool.generate(prompt_ids, seed, greedy)
        _busy(timer, generate=parts)
        return [s for part in parts for s in part.value]

    def score(self, rollout: Rollout, timer=None) -> Scores:
        """Reward, reference logprobs, old policy logprobs and values, all concurrently; the
        old logprobs are left to the update where its forward gives them (`Scores`)."""
        ref = ray.put(rollout)
        skip_old = update_gives_old_logprobs(self.cfg.algorithm)
        pol = [] if skip_old else self._policy_logprobs(rollout)
        crt = [a.forward_values.remote(s) for a, s in _shards(self.critic, rollout)]
        rew, ref_lp = self.reward.score.remote(ref), self.reference.forward_logprobs.remote(ref)
        out = self.get([rew, ref_lp, *pol, *crt], "score")
        n = len(pol)
        _busy(
            timer,
            reward=out[:1],
            reference=out[1:2],
            old_logprobs=out[2 : 2 + n],
            critic=out[2 + n :],
        )
        values = [o.value for o in out]
        return Scores(
            rewards=values[0].scores,
            ref_logprobs=values[1],
            old_logprobs=torch.cat(values[2 : 2 + n]) if pol else None,
            values=torch.cat(values[2 + n :]) if crt else torch.zeros_like(rollout.action_mask),
            reward=values[0],
        )

    def _policy_logprobs(self, rollout: Rollout) -> list:
        return [a.forward_logprobs.remote(s) for a, s in _shards(self.policy, rollout)]

    def policy_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """[B, R] `rollout`'s logprobs under the current policy (0 on padding)."""
        return torch.cat([o.value for o in self.get(self._policy_logprobs(rollout), "score")])

    def rewards(self, rollout: Rollout) -> RewardOutput:
        """The reward of `rollout` from the reward actor alone (evaluation)."""
        return self.get(self.reward.score.remote(rollout), "eval").value

    def train(
        self, exp: Experience, kl_coef: float, norms: list[LossNorm], timer=None
    ) -> StepUpdate:
        """Policy and critic updates, concurrently; stats averaged over ranks and epochs."""
        algo, pol, crt = self.cfg.algorithm, [], []
        for _ in range(algo.ppo_epochs):
            p = [a.train_step.remote(s, algo, kl_coef, norms) for a, s in _shards(self.policy, exp)]
            c = [a.train_step.remote(s, algo.value_clip_eps) for a, s in _shards(self.critic, exp)]
            out = self.get(p + c, "train")
            _busy(timer, train_policy=out[: len(p)], train_critic=out[len(p) :])
            pol += [o.value for o in out[: len(p)]]
            crt += [o.value for o in out[len(p) :]]
        own = [u.logprobs for u in pol]  # the ranks' shards, in row order (one epoch)
        return StepUpdate(
            mean_stats([u.stats for u in pol]),
            mean_stats(crt) if crt else TrainStats(loss=0.0),
            torch.cat(own) if exp.old_logprobs is None else None,
        )

    def sync_weights(self) -> SyncResult:
        """Push the policy's new weights into every engine and verify them (`WeightSync.sync`).
        An engine lost on the way is replaced (`EnginePool.sync_weights`)."""
        return self.pool.sync_weights()

    def policy_fingerprint(self, parts: int = 1) -> str:
        """What a sync must deliver (`WeightSync.policy_fingerprint`)."""
        return self.sync.policy_fingerprint(parts)

    def save_policy(self, path: str) -> None:
        self.get([a.save.remote(path) for a in self.policy], "save")

    def save_checkpoint(self, path: str) -> None:
        """Every ZeRO-3 rank writes its state under path/policy and path/critic."""
        calls = [a.save_checkpoint.remote(f"{path}/policy") for a in self.policy]
        calls += [a.save_checkpoint.remote(f"{path}/critic") for a in self.critic]
        self.get(calls, "checkpoint")

    def load_checkpoint(self, path: str, steps_done: int) -> None:
        """Load what `save_checkpoint` wrote into every rank, then sync the engines (they
        started from model_path's weights); later syncs hash the bytes when an uninterrupted
        run's would."""
        calls = [a.load_checkpoint.remote(f"{path}/policy") for a in self.policy]
        calls += [a.load_checkpoint.remote(f"{path}/critic") for a in self.critic]
        self.get(calls, "resume")
        self.sync.sync(hash_bytes=True)
        self.sync._syncs = steps_done  # the count `verify_every` reads

    def shutdown(self) -> None:
        """Kill every actor and release the role groups' reservations."""
        self.actors.shutdown()
