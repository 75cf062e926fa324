"""The DPO driver: N DeepSpeed ZeRO-3 policy ranks and a frozen reference actor on Ray.

    reference  log-probs of every train and eval pair, once; then the actor is released
    train      per batch of pairs: an equal shard per rank -> DPO loss -> one optimizer step
    eval       after each epoch: held-out implicit-reward accuracy (chosen beats rejected)
    save       the final policy in HF format under run_dir/policy

Caching the reference log-probs up front (as TRL's `precompute_ref_log_probs` does) costs one
forward pass per pair and frees the reference's resources for the whole training loop.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from transformers import AutoTokenizer

from rayrlhf.cluster.actors import ActorSet
from rayrlhf.cluster.placement import start_ray, threads_for
from rayrlhf.config import (
    ConfigError,
    PolicyConfig,
    RayRunConfig,
    ReferenceConfig,
    load_recipe,
)
from rayrlhf.data.preferences import PreferenceSet, load_preferences
from rayrlhf.data.synthetic import train_and_held_out
from rayrlhf.runtime.run_dir import MetricsWriter, write_run_config
from rayrlhf.runtime.zero3_run import DataSplitsConfig, check_data_source
from rayrlhf.runtime.zero3_run import prepare_inputs as prepare_run_inputs
from rayrlhf.types import shard_rows
from rayrlhf.workers.dpo import (
    DPOPolicyWorker,
    DPOReferenceWorker,
    DPOStepStats,
    EvalStats,
    PairLogps,
    implicit_reward_eval,
    mean_dpo_stats,
)

DEFAULT_DPO_CONFIG = "dpo-tiny-cpu.yaml"
CHUNK_PAIRS = 256
"""Pairs per remote call when scoring whole sets (bounds each call's padded batch)."""


class DPODataConfig(DataSplitsConfig):
    """{prompt, chosen, rejected} pairs; eval gives eval/reward_accuracy."""


class DPOConfig(RayRunConfig):
    """A DPO run: `rayrlhf dpo --config FILE --set key=value`. run_dir gets metrics.jsonl,
    config.yaml, the final HF policy (and the synthetic data)."""

    epochs: int = Field(1, ge=1)
    """Passes over the training pairs (ignored when `steps` is set)."""
    steps: int | None = Field(None, ge=1)
    """Optimizer steps to run; None runs `epochs` full passes."""
    beta: float = Field(0.1, gt=0)
    """DPO temperature: implicit reward = beta x (log pi - log pi_ref). IPO's tau."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """'sigmoid' is DPO (cDPO with label_smoothing > 0); 'ipo' is IPO."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """cDPO: assumed probability that a preference label is flipped (sigmoid loss only)."""
    batch_size: int = Field(32, ge=1)
    """Pairs per optimizer step, over all ranks."""
    synthetic_pairs: int | None = Field(None, ge=1)
    """Demo only: generate this many training pairs (and 100 held-out ones) into run_dir/data."""
    save_final: bool = True
    """Save the final policy in HF format under run_dir/policy."""
    policy: PolicyConfig
    """The policy trainer (DeepSpeed ZeRO-3 ranks); micro_batch_size counts pairs."""
    reference: ReferenceConfig = ReferenceConfig()
    """The frozen reference model; micro_batch_size counts pairs."""
    data: DPODataConfig = DPODataConfig()
    """The preference pairs."""

    @model_validator(mode="after")
    def _consistent(self) -> DPOConfig:
        per_step = self.policy.micro_batch_size * self.policy.num_ranks
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size={self.batch_size} must be divisible by policy.micro_batch_size x "
                f"policy.num_ranks = {per_step}"
            )
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing (cDPO) applies to loss_type 'sigmoid' only")
        check_data_source("synthetic_pairs", self.synthetic_pairs, self.data, "pairs")
        return self


def load_dpo_config(path: str | Path | None = None, overrides: list[str] = ()) -> DPOConfig:
    """Load a DPO recipe (default: the embedded tiny one), apply overrides, validate."""
    return load_recipe(DPOConfig, DEFAULT_DPO_CONFIG, path, overrides)


# ---- inputs, before Ray starts -------------------------------------------------------------


def prepare_inputs(cfg: DPOConfig) -> tuple[Path, Path | None]:
    """Build demo models and data if asked, check that every path exists: (train, eval)."""
    models = {
        "policy.model_path": cfg.policy.model_path,
        "reference.model_path": cfg.reference.model_path,
    }
    return prepare_run_inputs(cfg, models, cfg.synthetic_pairs, train_and_held_out)


def start_actors(cfg: DPOConfig, actors: ActorSet) -> tuple[list, object]:
    """The ZeRO-3 policy ranks, then the reference actor, each role in its own group."""
    pol, ref = cfg.policy, cfg.reference
    accum = cfg.batch_size // (pol.num_ranks * pol.micro_batch_size)
    policy = actors.start_zero3("policy", DPOPolicyWorker, pol, accum, cfg.seed)
    reference = actors.start_one(
        "reference", DPOReferenceWorker, ref.resources, ref.model_path or pol.model_path,
        ref.micro_batch_size, threads_for(ref.resources),
    )  # fmt: skip
    actors.wait_ready()
    return policy, reference


# ---- the phases ----------------------------------------------------------------------------


def set_logps(actors: ActorSet, group: list, pairs: PreferenceSet, phase: str) -> PairLogps:
    """Log-probs of every pair under `group` (the policy ranks, or [the reference]).

    Each chunk gets one equal shard per actor (ZeRO-3 forwards are collective): rows are
    repeated until the chunk divides, and the repeats are dropped from the result.
    """
    n, calls, sizes = len(group), [], []
    for start in range(0, len(pairs), CHUNK_PAIRS):
        idx = list(range(start, min(start + CHUNK_PAIRS, len(pairs))))
        shards = shard_rows(pairs.batch(idx + [idx[i % len(idx)] for i in range(-len(idx) % n)]), n)
        calls += [a.forward_pair_logps.remote(s) for a, s in zip(group, shards)]
        sizes.append(len(idx))
    out = actors.get(calls, phase)
    parts = [out[k * n : (k + 1) * n] for k in range(len(sizes))]
    chosen = [torch.cat([c for c, _ in p])[:size] for p, size in zip(parts, sizes)]
    rejected = [torch.cat([r for _, r in p])[:size] for p, size in zip(parts, sizes)]
    return PairLogps(torch.cat(chosen), torch.cat(rejected))


def train_step(
    actors: ActorSet, cfg: DPOConfig, pairs: PreferenceSet, ref: PairLogps, idx: list[int]
) -> DPOStepStats:
    """One DPO optimizer step on the pairs `idx`, sharded evenly over the ranks."""
    policy = actors.actors["policy"]
    n = len(policy)
    rows = torch.tensor(idx)
    ref_c, ref_r = ref.chosen[rows].chunk(n), ref.rejected[rows].chunk(n)
    calls = [
        a.dpo_step.remote(s, c, r, cfg.beta, cfg.label_smoothing, cfg.loss_type)
        for a, s, c, r in zip(policy, shard_rows(pairs.batch(idx), n), ref_c, ref_r)
    ]
    return mean_dpo_stats(actors.get(calls, "train"))


# ---- the run -------------------------------------------------------------------------------


class DPOLog:
    """Appends records to metrics.jsonl and prints one progress line per record."""

    def __init__(self, run_dir: Path, total_steps: int) -> None:
        self.out, self.total, self.start = MetricsWriter(run_dir), total_steps, time.time()

    def step(self, step: int, epoch: int, s: DPOStepStats, seconds: float) -> None:
        names = ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "margin")
        rec = {"step": step, "epoch": epoch, **{f"dpo/{k}": getattr(s, k) for k in names}}
        self.out.write({**rec, "time/step": seconds})
        eta = (time.time() - self.start) / (step + 1) * (self.total - step - 1)
        print(
            f"step {step + 1}/{self.total} | loss {s.loss:.4f} | acc {s.reward_accuracy:.2f} "
            f"| margin {s.margin:+.3f} (chosen {s.chosen_reward:+.3f} rejected "
            f"{s.rejected_reward:+.3f}) | step {seconds:.2f}s | eta {eta:.0f}s",
            flush=True,
        )

    def eval(self, step: int, epoch: int, e: EvalStats) -> None:
        self.out.write(
            {"step": step, "epoch": epoch, "eval/reward_accuracy": e.reward_accuracy,
             "eval/margin": e.margin, "eval/pairs": e.pairs}
        )  # fmt: skip
        print(
            f"eval after epoch {epoch + 1} | held-out reward accuracy {e.reward_accuracy:.3f} "
            f"| margin {e.margin:+.3f} | {e.pairs} pairs",
            flush=True,
        )


def train_dpo(cfg: DPOConfig) -> Path:
    """Check inputs, connect to Ray, run DPO; returns the run directory."""
    train_path, eval_path = prepare_inputs(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy.model_path)
    pairs = load_preferences(train_path, tokenizer, cfg.data.max_len)
    held_out = load_preferences(eval_path, tokenizer, cfg.data.max_len) if eval_path else None
    if len(pairs) < cfg.batch_size:
        raise ConfigError(
            f"invalid config:\n  batch_size: {cfg.batch_size} is more than the {len(pairs)} "
            f"pairs in {train_path}"
        )
    run_dir = write_run_config(cfg, cfg.run_dir)
    pol, ref_cpus = cfg.policy, cfg.reference.resources.num_cpus
    start_ray(cfg.ray_address, pol.num_ranks * pol.resources.num_cpus + ref_cpus)
    print(f"starting roles: policy x{cfg.policy.num_ranks} (ZeRO-3), reference", flush=True)
    with ActorSet(cfg.phase_timeout_s, cfg.placement_timeout_s) as actors:
        policy, reference = start_actors(cfg, actors)
        ref = set_logps(actors, [reference], pairs, "reference")
        ref_eval = set_logps(actors, [reference], held_out, "reference") if held_out else None
        actors.release("reference")  # its log-probs are cached: free its resources
        log = DPOLog(run_dir, _total_steps(cfg, pairs))
        _loop(actors, cfg, pairs, ref, held_out, ref_eval, log)
        if cfg.save_final:
            actors.get([a.save.remote(str(run_dir / "policy")) for a in policy], "save")
            print(f"final policy (HF format): {run_dir / 'policy'}", flush=True)
    return run_dir


def _total_steps(cfg: DPOConfig, pairs: PreferenceSet) -> int:
    return cfg.steps or cfg.epochs * (len(pairs) // cfg.batch_size)


def _loop(
    actors: ActorSet,
    cfg: DPOConfig,
    pairs: PreferenceSet,
    ref: PairLogps,
    held_out: PreferenceSet | None,
    ref_eval: PairLogps | None,
    log: DPOLog,
) -> None:
    """Train `_total_steps` steps over shuffled epochs; evaluate at each epoch's end."""
    per_epoch, total = len(pairs) // cfg.batch_size, _total_steps(cfg, pairs)
    order: list[int] = []
    for step in range(total):
        epoch, b = divmod(step, per_epoch)
        if b == 0:
            order = pairs.order(epoch, cfg.seed)  # pairs past the last full batch wait
        start = time.perf_counter()
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        stats = train_step(actors, cfg, pairs, ref, idx)
        log.step(step, epoch, stats, time.perf_counter() - start)
        if held_out is not None and (b == per_epoch - 1 or step == total - 1):
            policy = set_logps(actors, actors.actors["policy"], held_out, "eval")
            log.eval(step, epoch, implicit_reward_eval(policy, ref_eval, cfg.beta))


def main(config: str | None, overrides: list[str]) -> None:
    """`rayrlhf dpo`."""
    train_dpo(load_dpo_config(config, overrides))
