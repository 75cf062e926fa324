"""The PPO driver. Each step, on the role groups of `rayrlhf.recipes.ppo_roles`:

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
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoTokenizer

from rayrlhf.algorithms.experience import assemble_rollout, loss_norms, make_experience
from rayrlhf.algorithms.kl import kl_controller
from rayrlhf.algorithms.rewards import RunningMoments
from rayrlhf.cluster.capacity import cpus_needed
from rayrlhf.cluster.placement import start_ray
from rayrlhf.config import TrainConfig, load_config
from rayrlhf.data.prompts import PromptSet
from rayrlhf.models.tokenizer import pad_id
from rayrlhf.recipes.ppo_roles import Roles
from rayrlhf.runtime.evaluation import Evaluator
from rayrlhf.runtime.metrics import (
    PhaseTimer,
    PrometheusMetrics,
    StepLog,
    serve_metrics,
    step_record,
)
from rayrlhf.runtime.preflight import preflight
from rayrlhf.runtime.run_dir import write_run_config
from rayrlhf.types import Experience
from rayrlhf.workers.rollout import EngineSample


def train(cfg: TrainConfig) -> Path:
    """Check inputs, connect to Ray, run PPO for `cfg.steps` steps; returns the run directory."""
    algo, batch = cfg.algorithm, cfg.algorithm.rollout_batch_size
    with Run(cfg) as run:
        roles = run.roles
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
                if algo.mask_truncated:
                    exp = overlong_filter(exp, samples)
                norms = loss_norms(
                    exp, cfg.policy.num_ranks, algo.num_mini_batches, cfg.rollout.max_new_tokens
                )
            with t("train"):
                policy_stats, critic_stats = roles.train(exp, beta, norms, t)
            with t("sync"):
                sync = roles.sync_weights()
            run.kl_ctl.update(rollout_stats.kl, n_steps=len(rollout))
            evals = run.evaluate(roles, step)  # {} unless eval.every_steps makes it due
            run.record(
                step, rollout_stats, policy_stats, critic_stats, sync, t, samples, beta, evals
            )
        run.finish()
    return run.dir


def overlong_filter(exp: Experience, samples: list[EngineSample]) -> Experience:
    """DAPO's overlong filter: truncated responses' tokens leave the action mask, so they carry
    no loss and count in no normaliser (`loss_norms` reads the mask)."""
    keep = torch.tensor([not s.truncated for s in samples], dtype=exp.action_mask.dtype)
    return replace(exp, action_mask=exp.action_mask * keep[:, None])


class Run:
    """Everything around the loop: checks, Ray, the actors, the run directory and the metrics.

    Building it checks the inputs and holds nothing; entering it starts the metrics server and
    the roles, and leaving it, however the loop ends, releases both.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        preflight(cfg)
        tokenizer = AutoTokenizer.from_pretrained(cfg.policy.model_path)
        self.pad_id = pad_id(tokenizer)  # Llama-3 and Mistral tokenizers have no pad token
        self.prompts = PromptSet.load(cfg.data, tokenizer, cfg.seed)
        self.evaluate = Evaluator(cfg, tokenizer, self.pad_id)
        self.cfg = cfg
        self.dir = write_run_config(cfg, cfg.run_dir)
        self.prometheus: PrometheusMetrics | None = None
        self.roles: Roles | None = None
        self.log: StepLog | None = None
        self.kl_ctl = kl_controller(cfg.algorithm)
        self.moments = RunningMoments() if cfg.algorithm.reward_normalize else None

    def __enter__(self) -> Run:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        cfg = self.cfg
        if cfg.metrics.prometheus:
            self.prometheus = serve_metrics(cfg.metrics)
        start_ray(cfg.ray_address, cpus_needed(cfg))
        print(
            f"starting roles: policy x{cfg.policy.num_ranks} (ZeRO-3), "
            + (f"critic x{cfg.active_critic.num_ranks} (ZeRO-3), " if cfg.active_critic else "")
            + f"reference, reward, vLLM engines x{cfg.rollout.num_engines} "
            f"[{cfg.algorithm.advantage}]",
            flush=True,
        )
        self.roles = Roles(cfg)
        print(f"weight sync: {self.roles.transport}", flush=True)
        self.log = StepLog(self.dir, cfg.steps, tensorboard=cfg.metrics.tensorboard)

    def record(
        self, step, rollout_stats, policy_stats, critic_stats, sync, timer, samples, beta, evals
    ):
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
        rec.update(evals)
        rec["rollout/truncated_frac"] = sum(s.truncated for s in samples) / len(samples)
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
            from rayrlhf.runtime.plots import write_plots

            for path in write_plots(self.dir):
                print(f"plot: {path}", flush=True)

    def close(self) -> None:
        if self.roles is not None:
            self.roles.shutdown()
        if self.prometheus is not None:
            self.prometheus.close()
        if self.log is not None:
            self.log.close()


def main(config: str | None, overrides: list[str]) -> None:
    """`rayrlhf train`."""
    train(load_config(config, overrides))


def check_config(config: str | None, overrides: list[str]) -> None:
    """`rayrlhf check-config`: validate, run the pre-flight checks, print the resolved config."""
    cfg = load_config(config, overrides)
    preflight(cfg)
    print(cfg.model_dump_json(indent=2))
