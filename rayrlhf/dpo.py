"""The DPO driver: N DeepSpeed ZeRO-3 policy ranks and a frozen reference actor on Ray.

    reference  log-probs of every train and eval pair, once; then the actor is released
    train      per batch of pairs: an equal shard per rank -> DPO loss -> one optimizer step
    eval       after each epoch: held-out implicit-reward accuracy (chosen beats rejected)
    save       the final policy in HF format under run_dir/policy

Caching the reference log-probs up front (as TRL's `precompute_ref_log_probs` does) costs one
forward pass per pair and frees the reference's resources for the whole training loop.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import ray
import torch
import yaml
from pydantic import Field, model_validator
from ray.util.placement_group import remove_placement_group
from transformers import AutoTokenizer

from rayrlhf.cluster.placement import (
    GroupSpec,
    actor_options,
    reserve,
    start_zero3_ranks,
    threads_for,
)
from rayrlhf.cluster.placement import connect as join_or_start
from rayrlhf.cluster.waits import bounded_get
from rayrlhf.config import (
    ConfigError,
    PolicyConfig,
    ReferenceConfig,
    Section,
    load_recipe,
)
from rayrlhf.data.preferences import PreferenceSet, load_preferences
from rayrlhf.data.prompts import DataError
from rayrlhf.data.synthetic import train_and_held_out
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
from rayrlhf.zero3_run import check_data_source
from rayrlhf.zero3_run import prepare_inputs as prepare_run_inputs

DEFAULT_DPO_CONFIG = "dpo-tiny-cpu.yaml"
CHUNK_PAIRS = 256
"""Pairs per remote call when scoring whole sets (bounds each call's padded batch)."""


class DPODataConfig(Section):
    """Where the preference pairs come from, and how long they may be."""

    train: str | None = None
    """JSONL file of {prompt, chosen, rejected} training pairs (unset with synthetic_pairs)."""
    eval: str | None = None
    """JSONL file of held-out pairs for eval/reward_accuracy; None skips evaluation."""
    max_len: int = Field(64, ge=2)
    """Most tokens in prompt + response (either side); a longer pair is an error (file:line)."""


class DPOConfig(Section):
    """A DPO run: `rayrlhf dpo --config FILE --set key=value`."""

    run_dir: str = "runs/tiny-dpo"
    """Output directory: metrics.jsonl, config.yaml, the final HF policy (and synthetic data)."""
    seed: int = 0
    """Seed for pair order, initialisation and synthetic data."""
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
    make_tiny_models: str | None = None
    """Demo only: build the tiny models into this directory first if they are absent."""
    synthetic_pairs: int | None = Field(None, ge=1)
    """Demo only: generate this many training pairs (and 100 held-out ones) into run_dir/data."""
    ray_address: str | None = None
    """Ray cluster address; None joins the job's cluster or starts a local one."""
    phase_timeout_s: float = Field(900.0, gt=0)
    """Longest wait for one phase (reference, train step, eval, save) before an error."""
    placement_timeout_s: float = Field(60.0, gt=0)
    """Longest wait to reserve a role's resources before failing with what is missing."""
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


def connect(cfg: DPOConfig) -> None:
    """Join the configured cluster, the job's cluster, or start a local one big enough."""
    needed = cfg.policy.num_ranks * cfg.policy.resources.num_cpus
    join_or_start(cfg.ray_address, needed + cfg.reference.resources.num_cpus)


# ---- the actors ----------------------------------------------------------------------------


@dataclass
class DPOActors:
    """The policy ranks and the reference actor, each role in its own placement group."""

    policy: list
    reference: object | None
    timeout: float
    placement_groups: list = field(default_factory=list)

    def get(self, refs, phase: str):
        """`ray.get` bounded by the phase timeout, with an error that names the phase."""
        return bounded_get(refs, self.timeout, phase)

    def release_reference(self) -> None:
        """Kill the reference actor and free its bundle: its log-probs are cached."""
        if self.reference is not None:
            ray.kill(self.reference)
            remove_placement_group(self.placement_groups.pop())
            self.reference = None

    def shutdown(self) -> None:
        for actor in [*self.policy, self.reference]:
            if actor is not None:
                ray.kill(actor)
        for pg in self.placement_groups:
            remove_placement_group(pg)


def start_actors(cfg: DPOConfig, actors: DPOActors) -> None:
    """Reserve and start the ZeRO-3 policy ranks, then the reference (its group is last).

    Fills `actors` as it goes, so the caller's `shutdown` also cleans up a failed start.
    """
    pol = cfg.policy
    pg = reserve("policy", pol.resources, pol.num_ranks, cfg.placement_timeout_s)
    actors.placement_groups.append(pg)
    spec = GroupSpec(
        pol.model_path, pol.num_ranks, pol.micro_batch_size,
        cfg.batch_size // (pol.num_ranks * pol.micro_batch_size), pol.lr, pol.weight_decay,
        pol.grad_clip, cfg.seed, pol.resources,
    )  # fmt: skip
    actors.policy.extend(start_zero3_ranks(DPOPolicyWorker, pg, spec))
    ref = cfg.reference
    pg = reserve("reference", ref.resources, 1, cfg.placement_timeout_s)
    actors.placement_groups.append(pg)
    actors.reference = (
        ray.remote(DPOReferenceWorker)
        .options(**actor_options(pg, 0, ref.resources))
        .remote(ref.model_path or pol.model_path, ref.micro_batch_size, threads_for(ref.resources))
    )
    actors.get([a.__ray_ready__.remote() for a in [*actors.policy, actors.reference]], "start-up")


# ---- the phases ----------------------------------------------------------------------------


def set_logps(actors: DPOActors, group: list, pairs: PreferenceSet, phase: str) -> PairLogps:
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
    actors: DPOActors, cfg: DPOConfig, pairs: PreferenceSet, ref: PairLogps, idx: list[int]
) -> DPOStepStats:
    """One DPO optimizer step on the pairs `idx`, sharded evenly over the ranks."""
    n = len(actors.policy)
    rows = torch.tensor(idx)
    ref_c, ref_r = ref.chosen[rows].chunk(n), ref.rejected[rows].chunk(n)
    calls = [
        a.dpo_step.remote(s, c, r, cfg.beta, cfg.label_smoothing, cfg.loss_type)
        for a, s, c, r in zip(actors.policy, shard_rows(pairs.batch(idx), n), ref_c, ref_r)
    ]
    return mean_dpo_stats(actors.get(calls, "train"))


# ---- the run -------------------------------------------------------------------------------


class DPOLog:
    """Appends records to metrics.jsonl and prints one progress line per record."""

    def __init__(self, run_dir: Path, total_steps: int) -> None:
        self.path, self.total, self.start = run_dir / "metrics.jsonl", total_steps, time.time()
        self.path.unlink(missing_ok=True)

    def step(self, step: int, epoch: int, s: DPOStepStats, seconds: float) -> None:
        names = ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "margin")
        rec = {"step": step, "epoch": epoch, **{f"dpo/{k}": getattr(s, k) for k in names}}
        self._write({**rec, "time/step": seconds})
        eta = (time.time() - self.start) / (step + 1) * (self.total - step - 1)
        print(
            f"step {step + 1}/{self.total} | loss {s.loss:.4f} | acc {s.reward_accuracy:.2f} "
            f"| margin {s.margin:+.3f} (chosen {s.chosen_reward:+.3f} rejected "
            f"{s.rejected_reward:+.3f}) | step {seconds:.2f}s | eta {eta:.0f}s",
            flush=True,
        )

    def eval(self, step: int, epoch: int, e: EvalStats) -> None:
        self._write(
            {"step": step, "epoch": epoch, "eval/reward_accuracy": e.reward_accuracy,
             "eval/margin": e.margin, "eval/pairs": e.pairs}
        )  # fmt: skip
        print(
            f"eval after epoch {epoch + 1} | held-out reward accuracy {e.reward_accuracy:.3f} "
            f"| margin {e.margin:+.3f} | {e.pairs} pairs",
            flush=True,
        )

    def _write(self, rec: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


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
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    (run_dir / "config.yaml").write_text(config_text)
    connect(cfg)
    print(f"starting roles: policy x{cfg.policy.num_ranks} (ZeRO-3), reference", flush=True)
    actors = DPOActors([], None, cfg.phase_timeout_s)
    try:
        start_actors(cfg, actors)
        ref = set_logps(actors, [actors.reference], pairs, "reference")
        ref_eval = (
            set_logps(actors, [actors.reference], held_out, "reference") if held_out else None
        )
        actors.release_reference()
        log = DPOLog(run_dir, _total_steps(cfg, pairs))
        _loop(actors, cfg, pairs, ref, held_out, ref_eval, log)
        if cfg.save_final:
            actors.get([a.save.remote(str(run_dir / "policy")) for a in actors.policy], "save")
            print(f"final policy (HF format): {run_dir / 'policy'}", flush=True)
    finally:
        actors.shutdown()
    return run_dir


def _total_steps(cfg: DPOConfig, pairs: PreferenceSet) -> int:
    return cfg.steps or cfg.epochs * (len(pairs) // cfg.batch_size)


def _loop(
    actors: DPOActors,
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
            policy = set_logps(actors, actors.policy, held_out, "eval")
            log.eval(step, epoch, implicit_reward_eval(policy, ref_eval, cfg.beta))


def dpo_main(config: str | None, overrides: list[str]) -> int:
    """`rayrlhf dpo`: exit 0 on success, 2 on bad input found before Ray starts."""
    try:
        train_dpo(load_dpo_config(config, overrides))
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"rayrlhf: {err}", file=sys.stderr)
        return 2
    return 0
