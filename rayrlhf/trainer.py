"""The PPO driver. Each step, on the role groups of `rayrlhf.cluster.roles`:

    generate   vLLM engines sample one response per prompt (engine logprobs kept for checks)
    score      reward, reference logprobs, old policy logprobs and critic values, concurrently
    advantage  per-token k1 KL penalty + terminal reward -> GAE -> whitened advantages
    train      clipped PPO policy loss and clipped value loss, `ppo_epochs` passes, concurrently
    sync       gather ZeRO-3 buckets -> every engine, verified by fingerprint

Departure from the textbook: old logprobs are recomputed by the trainer rather than taken from
vLLM, so the importance ratio compares like with like; the engine's own logprobs are logged as
`rollout/engine_logprob_diff`, an early alarm for a broken weight sync.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray
import yaml
from transformers import AutoTokenizer

from rayrlhf.cluster.roles import Roles
from rayrlhf.config import TrainConfig
from rayrlhf.data.prompts import PromptSet
from rayrlhf.experience import assemble_rollout, make_experience
from rayrlhf.metrics import PhaseTimer, StepLog, step_record
from rayrlhf.preflight import preflight


def train(cfg: TrainConfig) -> Path:
    """Check inputs, connect to Ray, run PPO for `cfg.steps` steps; returns the run directory."""
    preflight(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy.model_path)
    prompts = PromptSet.load(cfg.data, tokenizer, cfg.seed)
    connect(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    )
    print(
        f"starting roles: policy x{cfg.policy.num_ranks} (ZeRO-3), critic x{cfg.critic.num_ranks} "
        f"(ZeRO-3), reference, reward, vLLM engines x{cfg.rollout.num_engines}",
        flush=True,
    )
    roles = Roles(cfg)
    log = StepLog(run_dir, cfg.steps)
    batch = cfg.ppo.rollout_batch_size
    for step in range(cfg.steps):
        t = PhaseTimer()
        texts, ids = prompts.batch(step, batch)
        with t("generate"):
            samples = roles.generate(ids, seed=cfg.seed * 1_000_003 + step * batch)
            rollout = assemble_rollout(samples, texts, tokenizer.pad_token_id)
        with t("score"):
            scores = roles.score(rollout)
        with t("advantage"):
            exp, rollout_stats = make_experience(rollout, scores, cfg.ppo)
        with t("train"):
            policy_stats, critic_stats = roles.train(exp)
        with t("sync"):
            sync = roles.sync_weights()
        log.write(step_record(step, rollout_stats, policy_stats, critic_stats, sync, t))
    if cfg.save_final:
        roles.save_policy(str(run_dir / "policy"))
        print(f"final policy (HF format): {run_dir / 'policy'}", flush=True)
    return run_dir


def connect(cfg: TrainConfig) -> None:
    """Join the configured cluster, the job's cluster, or start a local one big enough."""
    if ray.is_initialized():
        return
    if cfg.ray_address or _inside_ray_job():
        ray.init(address=cfg.ray_address or "auto")
        return
    needed = cfg.policy.num_ranks * cfg.policy.resources.num_cpus
    needed += cfg.critic.num_ranks * cfg.critic.resources.num_cpus
    needed += cfg.reference.resources.num_cpus + cfg.reward.resources.num_cpus
    needed += cfg.rollout.num_engines * cfg.rollout.resources.num_cpus
    # Logical CPUs may exceed the cores: each role still gets its own bundle.
    ray.init(num_cpus=max(int(needed + 0.999), os.cpu_count() or 1), include_dashboard=False)


def _inside_ray_job() -> bool:
    return bool(os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"))
