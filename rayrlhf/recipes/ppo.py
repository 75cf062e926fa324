"""The PPO driver. Each step, on the role groups of `rayrlhf.recipes.ppo_roles`:

    generate   vLLM engines sample one response per prompt (engine logprobs kept for checks)
    score      reward, reference logprobs, old policy logprobs and critic values, concurrently
    advantage  per-token k1 KL penalty + terminal reward -> GAE -> whitened advantages
    train      clipped PPO policy loss and clipped value loss, `ppo_epochs` passes, concurrently
    sync       each rank's ZeRO-3 pieces, a bucket at a time -> every engine, fingerprint-checked

Departure from the textbook: old logprobs are recomputed by the trainer rather than taken from
vLLM, so the importance ratio compares like with like; the engine's own logprobs are logged as
`rollout/engine_logprob_diff`, an early alarm for a broken weight sync. In one on-policy pass
(`update_gives_old_logprobs`) the update's own forward is that recomputation.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoTokenizer

from rayrlhf.algorithms.experience import (
    assemble_rollout,
    loss_norms,
    make_experience,
    with_update_logprobs,
)
from rayrlhf.algorithms.kl import kl_controller
from rayrlhf.algorithms.losses import pair_gap_limit
from rayrlhf.algorithms.rewards import RunningMoments
from rayrlhf.cluster.capacity import cpus_needed
from rayrlhf.cluster.placement import start_ray
from rayrlhf.cluster.waits import RoleFailed
from rayrlhf.config import TrainConfig, load_config
from rayrlhf.data.prompts import PromptSet
from rayrlhf.models.tokenizer import pad_id
from rayrlhf.recipes.ppo_roles import Roles
from rayrlhf.runtime.checkpoint import Checkpoints, dataset_fingerprint
from rayrlhf.runtime.engine_pool import pool_record
from rayrlhf.runtime.evaluation import Evaluator
from rayrlhf.runtime.faults import (
    RestartBudget,
    RunFailed,
    compute_dtypes,
    failure_line,
    gap_warning,
    log_failure,
    skip_line,
)
from rayrlhf.runtime.metrics import (
    PhaseTimer,
    PrometheusMetrics,
    StepLog,
    serve_metrics,
    step_record,
)
from rayrlhf.runtime.preflight import check_prompts, context_limit, preflight
from rayrlhf.runtime.run_dir import note_used_run_dir, write_run_config
from rayrlhf.runtime.scale import read_request
from rayrlhf.runtime.stop import EXIT_STOPPED, StopNow, Stopped, StopSignals
from rayrlhf.types import Experience, Scores, StepUpdate, TrainStats
from rayrlhf.workers.rollout import EngineSample


def train(cfg: TrainConfig) -> Path:
    """Check inputs, connect to Ray, run PPO for `cfg.steps` steps; returns the run directory.
    A dead or hung actor restarts the roles from the newest checkpoint while
    `fault.max_restarts` allows, else ends the run with one line (`RunFailed`)."""
    with Run(cfg) as run:
        while True:
            try:
                if run.start_step == 0:  # a resumed run has its step -1 record already
                    run.evaluate.at_start(run.roles, run.log.out.write)  # eval.at_start
                for step in run.steps():  # checkpoints, ledger, graceful stop
                    ppo_step(run, step)
                break
            except RoleFailed as fault:
                run.recover(fault)  # restarts the roles, or raises RunFailed
        run.finish()
    return run.dir


def ppo_step(run: Run, step: int) -> None:
    """One PPO step: generate -> score -> advantage -> train -> sync, then its record."""
    cfg, roles, t = run.cfg, run.roles, PhaseTimer()
    algo, batch = cfg.algorithm, cfg.algorithm.rollout_batch_size
    n = algo.n_samples_per_prompt  # a prompt's n samples are contiguous rows
    drawn = run.prompts.draw(step, batch // n, repeat=n)
    with t("generate"):
        seed = cfg.seed * 1_000_003 + step * batch
        samples = roles.generate(drawn.ids, seed=seed, timer=t)
        rollout = assemble_rollout(samples, drawn.texts, run.pad_id, drawn.columns)
    with t("score"):
        scores = roles.score(rollout, t)
    with t("advantage"):
        beta = run.kl_ctl.value
        exp, rollout_stats = make_experience(rollout, scores, algo, beta, run.moments)
        if algo.mask_truncated:
            exp = overlong_filter(exp, samples)
        exp = invalid_filter(exp, scores)
        norms = loss_norms(
            exp, cfg.policy.num_ranks, algo.num_mini_batches, cfg.rollout.max_new_tokens
        )
    with t("train"):
        update = train_unless_empty(roles, exp, beta, norms, t, step)
        run.check_skips(step, update.policy, update.critic)  # K non-finite in a row: stop
    if scores.old_logprobs is None:  # the update's forward gave them (none ran: ask the policy)
        own = roles.policy_logprobs(rollout) if update.logprobs is None else update.logprobs
        rollout_stats = with_update_logprobs(rollout_stats, rollout, scores.ref_logprobs, own, algo)
    with t("sync"):
        sync = roles.sync_weights()
    run.kl_ctl.update(rollout_stats.kl, n_steps=len(rollout))
    evals = run.evaluate(roles, step)  # {} unless eval.every_steps makes it due
    run.record(
        step, rollout_stats, update.policy, update.critic, sync, t, samples, beta,
        reward_record(scores) | evals,
    )  # fmt: skip


def overlong_filter(exp: Experience, samples: list[EngineSample]) -> Experience:
    """DAPO's overlong filter: truncated responses' tokens leave the action mask, so they carry
    no loss and count in no normaliser (`loss_norms` reads the mask)."""
    keep = torch.tensor([not s.truncated for s in samples], dtype=exp.action_mask.dtype)
    return replace(exp, action_mask=exp.action_mask * keep[:, None])


def invalid_filter(exp: Experience, scores: Scores) -> Experience:
    """Samples without a valid reward (a None, NaN or inf score) leave the action mask, as the
    overlong filter's do: no loss, no normaliser."""
    if scores.reward is None or scores.reward.valid.all():
        return exp
    keep = scores.reward.valid.to(exp.action_mask.dtype)
    return replace(exp, action_mask=exp.action_mask * keep[:, None])


def reward_record(scores: Scores) -> dict[str, float]:
    """reward/invalid (count) and reward/<extra> (mean over valid samples) of the step."""
    if scores.reward is None:
        return {}
    return {f"reward/{k}": v for k, v in scores.reward.summary().items()}


def train_unless_empty(roles: Roles, exp, beta, norms, timer, step) -> StepUpdate:
    """`Roles.train`, or no update (zero stats, a warning) when no action token is left, e.g.
    every sample's reward was invalid."""
    if exp.action_mask.sum().item() > 0:
        return roles.train(exp, beta, norms, timer)
    print(f"warning: step {step}: no sample left to train on (all rewards invalid or every "
          "response masked); the update is skipped", flush=True)  # fmt: skip
    return StepUpdate(TrainStats(loss=0.0), TrainStats(loss=0.0))


EXIT_FAILED = 1
"""Exit code of a run ended by an actor's failure (`RunFailed`)."""


class Run:
    """Everything around the loop: checks, Ray, the actors, the run directory and the metrics.

    Building it checks the inputs and holds nothing; entering it starts the metrics server and
    the roles, and leaving it, however the loop ends, releases both.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        preflight(cfg)
        tokenizer = AutoTokenizer.from_pretrained(cfg.policy.model_path)
        self.pad_id = pad_id(tokenizer)  # Llama-3 and Mistral tokenizers have no pad token
        self.prompts = PromptSet.load(cfg.data, tokenizer, cfg.seed, context_limit(cfg))
        self.evaluate = Evaluator(cfg, tokenizer, self.pad_id)  # reads eval data, writes none
        self.cfg = cfg
        p = self.prompts
        self.checkpoints = Checkpoints(
            cfg, Path(cfg.run_dir), dataset_fingerprint(p.texts, p.ids, p.columns)
        )
        # Checked before Ray starts and before run_dir is touched: an incompatible checkpoint
        # is a config error (exit 2) that leaves the run as it was.
        self.resume_from = self.checkpoints.resume_point() if cfg.resume else None
        self.dir = write_run_config(cfg, cfg.run_dir)
        self.prometheus: PrometheusMetrics | None = None
        self.roles: Roles | None = None
        self.log: StepLog | None = None
        self.kl_ctl = kl_controller(cfg.algorithm)
        self.moments = RunningMoments() if cfg.algorithm.reward_normalize else None
        self.start_step, self.ledger = 0, list[list[int]]()
        self.step: int | None = None
        """The step in progress (0-based), None before the first."""
        self.stop = StopSignals()
        self.restarts = RestartBudget(cfg.fault.max_restarts)
        self.scale_request: int | None = None
        """The last `rayrlhf scale` request applied."""
        self.gap_limit = pair_gap_limit(*compute_dtypes(cfg))

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
        self.stop.install()  # after ray.init, which installs a SIGTERM handler that aborts
        print(
            f"starting roles: policy x{cfg.policy.num_ranks} (ZeRO-3), "
            + (f"critic x{cfg.active_critic.num_ranks} (ZeRO-3), " if cfg.active_critic else "")
            + f"reference, reward, vLLM engines x{cfg.rollout.num_engines} "
            f"[{cfg.algorithm.advantage}]",
            flush=True,
        )
        self.roles = Roles(cfg)
        print(f"weight sync: {self.roles.transport}", flush=True)
        if cfg.resume:
            self._resume()
        self.log = StepLog(self.dir, cfg.steps, tensorboard=cfg.metrics.tensorboard)

    def _resume(self) -> None:
        """Load the checkpoint found at start-up into the ranks, the engines and the driver; its
        records replace run_dir's (records after its step are dropped, then appended to)."""
        path = self.resume_from
        self.kl_ctl = kl_controller(self.cfg.algorithm)  # fresh, as at step 0 ...
        self.moments = RunningMoments() if self.cfg.algorithm.reward_normalize else None
        self.start_step, self.ledger = 0, []  # ... unless the checkpoint says otherwise
        if path is None:
            self.checkpoints.reset_records(None)
            print(f"resume: no complete checkpoint in {self.dir}; starting at step 1", flush=True)
            return
        state = self.checkpoints.restore(path, self.roles)
        self.start_step, self.ledger = state["step"], state["ledger"]
        vars(self.kl_ctl).update(state["kl"])
        if self.moments is not None:
            vars(self.moments).update(state["moments"])
        print(f"resumed from {path} (step {self.start_step}/{self.cfg.steps} done)", flush=True)

    def steps(self):
        """The loop's step indices, from 0 or a resumed checkpoint's step. After each step: its
        prompts join the ledger, a checkpoint is written when due, and a signal's graceful stop
        (a checkpoint, then `Stopped`) happens."""
        algo = self.cfg.algorithm
        size = algo.rollout_batch_size // algo.n_samples_per_prompt
        for step in range(self.start_step, self.cfg.steps):
            self.step = step
            if self.stop.requested:  # before this launch's first step: nothing new to save
                raise Stopped(self._stop_line(step, self.resume_from))
            self._apply_scale_request()
            yield step
            self.ledger.append(self.prompts.indices(step, size))
            with (self.dir / "ledger.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, "prompts": self.ledger[-1]}) + "\n")
            if self.checkpoints.due(step + 1) or self.stop.requested:
                path = self.checkpoints.save(step + 1, self.roles, self._state())
                print(f"checkpoint: {path}", flush=True)
                if self.stop.requested:
                    raise Stopped(self._stop_line(step + 1, path))

    def _apply_scale_request(self) -> None:
        """A new `rayrlhf scale` request resizes the pool (once: one the cluster had no room
        for is not retried every step)."""
        engines = read_request(self.dir)
        if engines is not None and engines != self.scale_request:
            self.scale_request = engines
            self.roles.pool.resize(engines)

    def recover(self, fault: RoleFailed) -> None:
        """After `fault`: log it, then rebuild every role and go on from the newest complete
        checkpoint (step 0 without one) if the restart budget allows; else raise RunFailed."""
        checkpoint = self.checkpoints.resume_point()
        step = None if self.step is None else self.step + 1
        line = failure_line(fault, step, checkpoint)
        log = log_failure(self.dir, line, fault)
        if not self.restarts.take(fault):
            raise RunFailed(f"{line} (details: {log})") from fault
        r = self.restarts
        print(f"{line.split('; resume')[0]}; restarting from it (restart {r.used}/{r.max})",
              flush=True)  # fmt: skip
        self.log.close()
        engine_restarts = self.roles.pool.restarts  # the budget is the launch's
        self.roles.shutdown()
        self.log = self.roles = None
        self.resume_from = checkpoint
        self.roles = Roles(self.cfg, engine_restarts)
        self.scale_request = None  # the new pool starts at num_engines: ask again
        self._resume()
        self.log = StepLog(self.dir, self.cfg.steps, tensorboard=self.cfg.metrics.tensorboard)

    def check_skips(self, step: int, *stats: TrainStats) -> None:
        """Stop (RunFailed) after `fault.max_skipped_steps` non-finite optimizer steps in a row
        (`faults.skip_line`); no checkpoint is written for this step."""
        line = skip_line(step, stats, self.cfg.fault.max_skipped_steps, self.checkpoints)
        if line:
            raise RunFailed(line)

    def _state(self) -> dict:
        """The driver's part of a checkpoint (`Checkpoints.save` adds the step and the RNGs)."""
        moments = vars(self.moments) if self.moments is not None else None
        return {"kl": vars(self.kl_ctl), "moments": moments, "ledger": self.ledger}

    def _stop_line(self, steps_done: int, path) -> str:
        return (
            f"rayrlhf: stopped by {self.stop.requested} after step {steps_done}; "
            f"checkpoint: {path or 'none'}; resume with --resume"
        )

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
        per_engine = Counter()
        for s in samples:
            per_engine[s.engine] += len(s.response_ids)
        rec.update(pool_record(self.roles.pool, per_engine))
        self.log.write(rec)
        if warning := gap_warning(step, rollout_stats.engine_logprob_gap_mean, self.gap_limit):
            print(warning, flush=True)
        if self.prometheus is not None:
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
        self.stop.restore()


def main(config: str | None, overrides: list[str], resume: bool = False) -> int:
    """`rayrlhf train`: exit 0 when done, EXIT_STOPPED (3) after a signal's graceful stop (a
    checkpoint was written), EXIT_FAILED (1) after an actor failure (one line; the details in
    run_dir/errors.log), 128 + the signal after a second signal (no checkpoint)."""
    try:
        train(load_config(config, [*overrides, *(["resume=true"] if resume else [])]))
    except Stopped as stop:
        print(stop, file=sys.stderr, flush=True)
        return EXIT_STOPPED
    except StopNow as stop:
        print(f"rayrlhf: {stop}", file=sys.stderr, flush=True)
        return 128 + stop.signum
    except RunFailed as failed:
        print(failed, file=sys.stderr, flush=True)
        return EXIT_FAILED
    return 0


def check_config(config: str | None, overrides: list[str]) -> None:
    """`rayrlhf check-config`: validate, run the pre-flight checks, print the resolved config."""
    cfg = load_config(config, overrides)
    preflight(cfg)
    check_prompts(cfg)
    print(cfg.model_dump_json(indent=2))
    note_used_run_dir(cfg)
