"""The PPO driver. Each step, on the role groups of `rayrlhf.cluster.roles`:

    generate   vLLM engines sample one response per prompt (engine logprobs kept for checks)
    score      reward, reference logprobs, old policy logprobs and critic values, concurrently
    advantage  per-token k1 KL penalty + terminal reward -> GAE -> whitened advantages
    train      clipped PPO policy loss and clipped value loss, `ppo_epochs` passes, concurrently
    sync       each rank's ZeRO-3 pieces, a bucket at a time -> every engine, fingerprint-checked

Departure from the textbook: old logprobs are recomputed by the trainer rather than taken from
vLLM, so the importance ratio compares like with like; the engine's own logprobs are logged as
`rollout/engine_logprob_diff`, an early alarm for a broken weight sync.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml
from transformers import AutoTokenizer

from rayrlhf.algorithms.kl import AdaptiveKLController, FixedKLController
from rayrlhf.algorithms.rewards import RunningMoments
from rayrlhf.cluster.placement import connect as join_or_start
from rayrlhf.cluster.roles import Roles
from rayrlhf.config import AlgorithmConfig, ConfigError, TrainConfig
from rayrlhf.data.prompts import PromptSet
from rayrlhf.experience import assemble_rollout, loss_norms, make_experience
from rayrlhf.metrics import PhaseTimer, PrometheusMetrics, StepLog, step_record
from rayrlhf.preflight import preflight


def train(cfg: TrainConfig) -> Path:
    """Check inputs, connect to Ray, run PPO for `cfg.steps` steps; returns the run directory."""
    run, algo = Run(cfg), cfg.algorithm
    roles, batch = run.roles, algo.rollout_batch_size
    try:
        for step in range(cfg.steps):
            t = PhaseTimer()
            n = algo.n_samples_per_prompt  # a prompt's n samples are contiguous rows
            texts, ids = run.prompts.batch(step, batch // n, repeat=n)
            with t("generate"):
                samples = roles.generate(ids, seed=cfg.seed * 1_000_003 + step * batch, timer=t)
                rollout = assemble_rollout(samples, texts, run.pad_id)
            with t("score"):
                scores = roles.score(rollout, t)
            with t("advantage"):
                beta = run.kl_ctl.value
                exp, rollout_stats = make_experience(rollout, scores, algo, beta, run.moments)
                norms = loss_norms(
                    exp, cfg.policy.num_ranks, algo.num_mini_batches, cfg.rollout.max_new_tokens
                )
            with t("train"):
                policy_stats, critic_stats = roles.train(exp, beta, norms, t)
            with t("sync"):
                sync = roles.sync_weights()
            run.kl_ctl.update(rollout_stats.kl, n_steps=len(rollout))
            run.record(step, rollout_stats, policy_stats, critic_stats, sync, t, samples, beta)
        run.finish()
    finally:
        run.close()
    return run.dir


def kl_controller(algo: AlgorithmConfig) -> FixedKLController | AdaptiveKLController:
    if algo.kl_controller == "adaptive":
        return AdaptiveKLController(
            algo.kl_coef,
            algo.kl_target,
            algo.kl_horizon,
            gain=algo.kl_gain,
            min_coef=algo.kl_coef_min,
            max_coef=algo.kl_coef_max or float("inf"),
        )
    return FixedKLController(algo.kl_coef)


class Run:
    """Everything around the loop: checks, Ray, the actors, the run directory and the metrics."""

    def __init__(self, cfg: TrainConfig) -> None:
        preflight(cfg)
        tokenizer = AutoTokenizer.from_pretrained(cfg.policy.model_path)
        self.pad_id = tokenizer.pad_token_id
        self.prompts = PromptSet.load(cfg.data, tokenizer, cfg.seed)
        self.cfg = cfg
        self.dir = Path(cfg.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "metrics.jsonl").unlink(missing_ok=True)
        config_text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        (self.dir / "config.yaml").write_text(config_text)
        self.prometheus = None
        if cfg.metrics.prometheus:
            try:
                self.prometheus = PrometheusMetrics(cfg.metrics.host, cfg.metrics.port)
            except OSError as err:
                raise ConfigError(
                    f"invalid config:\n  metrics.port: cannot serve on "
                    f"{cfg.metrics.host}:{cfg.metrics.port}: {err}"
                ) from None
            print(f"prometheus metrics: {self.prometheus.url}", flush=True)
        connect(cfg)
        print(
            f"starting roles: policy x{cfg.policy.num_ranks} (ZeRO-3), "
            + (f"critic x{cfg.active_critic.num_ranks} (ZeRO-3), " if cfg.active_critic else "")
            + f"reference, reward, vLLM engines x{cfg.rollout.num_engines} "
            f"[{cfg.algorithm.advantage}]",
            flush=True,
        )
        self.roles = Roles(cfg)
        print(f"weight sync: {self.roles.transport}", flush=True)
        self.kl_ctl = kl_controller(cfg.algorithm)
        self.moments = RunningMoments() if cfg.algorithm.reward_normalize else None
        self.log = StepLog(self.dir, cfg.steps)

    def record(self, step, rollout_stats, policy_stats, critic_stats, sync, timer, samples, beta):
        rec = step_record(
            step,
            rollout_stats,
            policy_stats,
            critic_stats,
            sync,
            timer,
            self.cfg.algorithm.ppo_epochs,
        )
        rec["rollout/kl_coef"] = beta
        self.log.write(rec)
        if self.prometheus is not None:
            per_engine = Counter()
            for s in samples:
                per_engine[s.engine] += len(s.response_ids)
            self.prometheus.observe(rec, timer, per_engine)

    def finish(self) -> None:
        if self.cfg.save_final:
            self.roles.save_policy(str(self.dir / "policy"))
            print(f"final policy (HF format): {self.dir / 'policy'}", flush=True)
        if self.cfg.metrics.plots:
            from rayrlhf.report import write_plots

            for path in write_plots(self.dir):
                print(f"plot: {path}", flush=True)

    def close(self) -> None:
        self.roles.shutdown()
        if self.prometheus is not None:
            self.prometheus.close()


def connect(cfg: TrainConfig) -> None:
    """Join the configured cluster, the job's cluster, or start a local one big enough."""
    needed = cfg.policy.num_ranks * cfg.policy.resources.num_cpus
    if cfg.active_critic:
        needed += cfg.active_critic.num_ranks * cfg.active_critic.resources.num_cpus
    needed += cfg.reference.resources.num_cpus + cfg.reward.resources.num_cpus
    needed += cfg.rollout.num_engines * cfg.rollout.resources.num_cpus
    join_or_start(cfg.ray_address, needed)
