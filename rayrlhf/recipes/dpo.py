"""The preference-optimisation driver (`rayrlhf dpo`): N DeepSpeed ZeRO-3 policy ranks, and a
frozen reference actor for the losses that use one.

    reference  log-probs of every train and eval pair, once; then the actor is released
               (dpo, ipo, cdpo, kto; orpo and simpo start none and reserve nothing for it)
    train      per batch of pairs: an equal shard per rank -> the loss -> one optimizer step
    eval       after each epoch: held-out accuracy of the loss's implicit reward (chosen beats
               rejected; for kto, each row on its label's side of the reference point)
    save       the final policy in HF format under run_dir/policy

`loss` picks one of `rayrlhf.algorithms.preference.PREFERENCE_LOSSES`. KTO trains on unpaired
rows {prompt, completion, label} (`rayrlhf.data.kto`), laid out like pairs: each row's completion
beside a mismatched completion that estimates KTO's KL reference point.

Caching the reference log-probs up front (as TRL's `precompute_ref_log_probs` does) costs one
forward pass per pair and frees the reference's resources for the whole training loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor
from transformers import AutoTokenizer

from rayrlhf.algorithms.preference import LossParams, PreferenceLoss, preference_loss_entry
from rayrlhf.cluster.actors import ActorSet
from rayrlhf.cluster.placement import start_ray, threads_for
from rayrlhf.config import (
    ConfigError,
    OnBadRow,
    PolicyConfig,
    PreferenceLossName,
    RayRunConfig,
    ReferenceConfig,
    load_recipe,
)
from rayrlhf.data.kto import load_kto
from rayrlhf.data.preferences import PreferenceSet, load_preferences
from rayrlhf.data.synthetic import kto_train_and_held_out, train_and_held_out
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
    mean_dpo_stats,
    preference_eval,
    set_scores,
    step_batch,
)

DEFAULT_DPO_CONFIG = "dpo-tiny-cpu.yaml"
CHUNK_PAIRS = 256
"""Pairs per remote call when scoring whole sets (bounds each call's padded batch)."""
LOSS_FIELDS: dict[str, PreferenceLossName] = {
    "label_smoothing": "cdpo",
    "simpo_gamma": "simpo",
    "kto_desirable_weight": "kto",
    "kto_undesirable_weight": "kto",
}
"""The settings that only one loss reads; changing one for another loss is an error."""


class DPODataConfig(DataSplitsConfig):
    """{prompt, chosen, rejected} pairs (kto: {prompt, completion, label} rows, label a JSON
    boolean); eval gives eval/reward_accuracy."""


class DPOConfig(RayRunConfig):
    """A preference-optimisation run: `rayrlhf dpo --config FILE --set key=value`. run_dir gets
    metrics.jsonl, config.yaml, the final HF policy (and the synthetic data)."""

    loss: PreferenceLossName = "dpo"
    """dpo (Rafailov et al. 2023), ipo (Azar et al. 2023), cdpo (DPO with label_smoothing),
    kto (Ethayarajh et al. 2024: unpaired rows), orpo (Hong et al. 2024) or simpo (Meng et al.
    2024). orpo and simpo use no reference model, so none is started."""
    epochs: int = Field(1, ge=1)
    """Passes over the training pairs (ignored when `steps` is set)."""
    steps: int | None = Field(None, ge=1)
    """Optimizer steps to run; None runs `epochs` full passes."""
    beta: float = Field(0.1, gt=0)
    """dpo, cdpo, kto: implicit reward = beta x (log pi - log pi_ref); ipo: tau; simpo: the
    reward scale of the mean token log-prob (the paper uses 2 to 2.5); orpo: lambda, the weight
    of the odds-ratio term beside the SFT loss."""
    label_smoothing: float = Field(0.1, gt=0, lt=0.5)
    """cdpo: assumed probability that a preference label is flipped."""
    simpo_gamma: float = Field(0.5, ge=0)
    """simpo: target reward margin gamma, in reward units (the paper tunes gamma / beta near
    0.5)."""
    kto_desirable_weight: float = Field(1.0, gt=0)
    """kto: lambda_D, the weight of desirable rows. The paper keeps lambda_D x desirable rows /
    (lambda_U x undesirable rows) within [1, 4/3]."""
    kto_undesirable_weight: float = Field(1.0, gt=0)
    """kto: lambda_U, the weight of undesirable rows."""
    batch_size: int = Field(32, ge=1)
    """Pairs (kto: rows) per optimizer step, over all ranks."""
    synthetic_pairs: int | None = Field(None, ge=1)
    """Demo only: generate this many training pairs (and 100 held-out ones) into run_dir/data;
    for kto both sides of each pair become rows (kind words desirable, unkind undesirable)."""
    on_bad_row: OnBadRow = "error"
    """A malformed data row stops the run naming file:line ('error'), or is left out and
    counted ('skip')."""
    save_final: bool = True
    """Save the final policy in HF format under run_dir/policy."""
    policy: PolicyConfig
    """The policy trainer (DeepSpeed ZeRO-3 ranks); micro_batch_size counts pairs."""
    reference: ReferenceConfig = ReferenceConfig()
    """The frozen reference model (dpo, ipo, cdpo, kto); micro_batch_size counts pairs."""
    data: DPODataConfig = DPODataConfig()
    """The preference pairs (kto: rows)."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "loss_type" in data:
            raise ValueError(
                "loss_type is now loss: sigmoid -> loss=dpo (loss=cdpo with label_smoothing), "
                "ipo -> loss=ipo; kto, orpo and simpo are new"
            )
        return data

    @model_validator(mode="after")
    def _consistent(self) -> DPOConfig:
        per_step = self.policy.micro_batch_size * self.policy.num_ranks
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size={self.batch_size} must be divisible by policy.micro_batch_size x "
                f"policy.num_ranks = {per_step}"
            )
        # A setting the loss never reads is an error, unless it is at its default: a run's
        # config.yaml records every field and must load again as it was written.
        defaults = type(self).model_fields
        for name, loss in LOSS_FIELDS.items():
            if getattr(self, name) != defaults[name].default and self.loss != loss:
                raise ValueError(f"{name} applies to loss={loss} only, not loss={self.loss}")
        if self.reference != ReferenceConfig() and not self.loss_entry.uses_reference:
            raise ValueError(
                f"reference: loss={self.loss} uses no reference model; remove the section"
            )
        what = "KTO rows" if self.loss_entry.unpaired else "pairs"
        check_data_source("synthetic_pairs", self.synthetic_pairs, self.data, what)
        return self

    @property
    def loss_entry(self) -> PreferenceLoss:
        """The registry entry of `loss`: its function and what it needs."""
        return preference_loss_entry(self.loss)

    @property
    def loss_params(self) -> LossParams:
        """The loss's hyper-parameters, as the workers take them (each loss reads its own)."""
        return LossParams(
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            simpo_gamma=self.simpo_gamma,
            desirable_weight=self.kto_desirable_weight,
            undesirable_weight=self.kto_undesirable_weight,
        )

    @property
    def rows(self) -> str:
        """What one training example is, for messages."""
        return "rows" if self.loss_entry.unpaired else "pairs"


def load_dpo_config(path: str | Path | None = None, overrides: list[str] = ()) -> DPOConfig:
    """Load a DPO recipe (default: the embedded tiny one), apply overrides, validate."""
    return load_recipe(DPOConfig, DEFAULT_DPO_CONFIG, path, overrides)


# ---- inputs, before Ray starts -------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One data file in the pair layout, with KTO's labels."""

    rows: PreferenceSet
    """Pairs; for kto each row's completion, then its mismatched completion."""
    desirable: Tensor | None
    """kto: [N] bool labels; None for pairs."""

    def __len__(self) -> int:
        return len(self.rows)


def prepare_inputs(cfg: DPOConfig) -> tuple[Path, Path | None]:
    """Build demo models and data if asked, check that every path exists: (train, eval)."""
    models = {"policy.model_path": cfg.policy.model_path}
    if cfg.loss_entry.uses_reference:
        models["reference.model_path"] = cfg.reference.model_path
    generate = kto_train_and_held_out if cfg.loss_entry.unpaired else train_and_held_out
    return prepare_run_inputs(cfg, models, cfg.synthetic_pairs, generate)


def load_split(cfg: DPOConfig, path: Path, tokenizer) -> Split:
    """The pairs (kto: rows) of `path`, validated and tokenized; reports skipped rows."""
    max_len = cfg.data.max_len
    if cfg.loss_entry.unpaired:
        kto = load_kto(path, tokenizer, max_len, cfg.on_bad_row)
        split = Split(kto.sides, torch.tensor(kto.desirable))
    else:
        split = Split(load_preferences(path, tokenizer, max_len, cfg.on_bad_row), None)
    if split.rows.skipped:
        print(f"{path}: skipped {split.rows.skipped} bad row(s) (on_bad_row=skip)", flush=True)
    return split


def start_actors(cfg: DPOConfig, actors: ActorSet) -> list:
    """The ZeRO-3 policy ranks, then the reference actor if the loss uses one, each role in its
    own group."""
    pol, ref = cfg.policy, cfg.reference
    accum = cfg.batch_size // (pol.num_ranks * pol.micro_batch_size)
    policy = actors.start_zero3("policy", DPOPolicyWorker, pol, accum, cfg.seed)
    if cfg.loss_entry.uses_reference:
        actors.start_one(
            "reference", DPOReferenceWorker, ref.resources, ref.model_path or pol.model_path,
            ref.micro_batch_size, threads_for(ref.resources),
        )  # fmt: skip
    actors.wait_ready()
    return policy


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


def reference_logps(
    actors: ActorSet, train: Split, held_out: Split | None
) -> tuple[PairLogps, PairLogps | None]:
    """The reference's log-probs of every train and held-out row, once; then it is released."""
    group = actors.actors["reference"]
    ref = set_logps(actors, group, train.rows, "reference")
    ref_eval = set_logps(actors, group, held_out.rows, "reference") if held_out else None
    actors.release("reference")  # its log-probs are cached: free its resources
    return ref, ref_eval


def train_step(
    actors: ActorSet, cfg: DPOConfig, data: Split, ref: PairLogps | None, idx: list[int]
) -> DPOStepStats:
    """One optimizer step on the rows `idx`, sharded evenly over the ranks."""
    policy, rows = actors.actors["policy"], torch.tensor(idx)
    batch = step_batch(
        data.rows.batch(idx),
        None if ref is None else PairLogps(ref.chosen[rows], ref.rejected[rows]),
        None if data.desirable is None else data.desirable[rows],
    )
    calls = [
        a.preference_step.remote(shard, cfg.loss, cfg.loss_params)
        for a, shard in zip(policy, shard_rows(batch, len(policy)))
    ]
    return mean_dpo_stats(actors.get(calls, "train"))


def evaluate(actors: ActorSet, cfg: DPOConfig, held_out: Split, ref: PairLogps | None):
    """The loss's held-out implicit-reward accuracy under the current policy."""
    policy = set_logps(actors, actors.actors["policy"], held_out.rows, "eval")
    scores = set_scores(held_out.rows, policy, ref, held_out.desirable)
    return preference_eval(cfg.loss, cfg.loss_params, scores)


# ---- the run -------------------------------------------------------------------------------


class DPOLog:
    """Appends records to metrics.jsonl and prints one progress line per record."""

    def __init__(self, run_dir: Path, total_steps: int, rows: str = "pairs") -> None:
        self.out, self.total, self.start = MetricsWriter(run_dir), total_steps, time.time()
        self.rows = rows

    def step(self, step: int, epoch: int, s: DPOStepStats, seconds: float) -> None:
        names = ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "margin")
        extra = {k: getattr(s, k) for k in ("nll", "kl") if getattr(s, k) is not None}
        values = {**{k: getattr(s, k) for k in names}, **extra}
        rec = {"step": step, "epoch": epoch, **{f"dpo/{k}": v for k, v in values.items()}}
        self.out.write({**rec, "time/step": seconds})
        eta = (time.time() - self.start) / (step + 1) * (self.total - step - 1)
        more = "".join(f" | {k} {v:.3f}" for k, v in extra.items())
        print(
            f"step {step + 1}/{self.total} | loss {s.loss:.4f} | acc {s.reward_accuracy:.2f} "
            f"| margin {s.margin:+.3f} (chosen {s.chosen_reward:+.3f} rejected "
            f"{s.rejected_reward:+.3f}){more} | step {seconds:.2f}s | eta {eta:.0f}s",
            flush=True,
        )

    def eval(self, step: int, epoch: int, e: EvalStats) -> None:
        self.out.write(
            {"step": step, "epoch": epoch, "eval/reward_accuracy": e.reward_accuracy,
             "eval/margin": e.margin, "eval/pairs": e.pairs}
        )  # fmt: skip
        print(
            f"eval after epoch {epoch + 1} | held-out reward accuracy {e.reward_accuracy:.3f} "
            f"| margin {e.margin:+.3f} | {e.pairs} {self.rows}",
            flush=True,
        )


def train_dpo(cfg: DPOConfig) -> Path:
    """Check inputs, connect to Ray, run the preference loss; returns the run directory."""
    train_path, eval_path = prepare_inputs(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy.model_path)
    train = load_split(cfg, train_path, tokenizer)
    held_out = load_split(cfg, eval_path, tokenizer) if eval_path else None
    if len(train) < cfg.batch_size:
        raise ConfigError(
            f"invalid config:\n  batch_size: {cfg.batch_size} is more than the {len(train)} "
            f"{cfg.rows} in {train_path}"
        )
    run_dir = write_run_config(cfg, cfg.run_dir, keep=[p for p in (train_path, eval_path) if p])
    pol, uses_ref = cfg.policy, cfg.loss_entry.uses_reference
    ref_cpus = cfg.reference.resources.num_cpus if uses_ref else 0.0
    start_ray(cfg.ray_address, pol.num_ranks * pol.resources.num_cpus + ref_cpus)
    roles = "reference" if uses_ref else f"no reference ({cfg.loss} is reference-free)"
    print(
        f"starting roles: policy x{pol.num_ranks} (ZeRO-3), {roles} | loss {cfg.loss}", flush=True
    )
    with ActorSet(cfg.phase_timeout_s, cfg.placement_timeout_s) as actors:
        policy = start_actors(cfg, actors)
        ref, ref_eval = reference_logps(actors, train, held_out) if uses_ref else (None, None)
        log = DPOLog(run_dir, _total_steps(cfg, train), cfg.rows)
        _loop(actors, cfg, train, ref, held_out, ref_eval, log)
        if cfg.save_final:
            actors.get([a.save.remote(str(run_dir / "policy")) for a in policy], "save")
            print(f"final policy (HF format): {run_dir / 'policy'}", flush=True)
    return run_dir


def _total_steps(cfg: DPOConfig, train: Split) -> int:
    return cfg.steps or cfg.epochs * (len(train) // cfg.batch_size)


def _loop(
    actors: ActorSet,
    cfg: DPOConfig,
    train: Split,
    ref: PairLogps | None,
    held_out: Split | None,
    ref_eval: PairLogps | None,
    log: DPOLog,
) -> None:
    """Train `_total_steps` steps over shuffled epochs; evaluate at each epoch's end."""
    per_epoch, total = len(train) // cfg.batch_size, _total_steps(cfg, train)
    order: list[int] = []
    for step in range(total):
        epoch, b = divmod(step, per_epoch)
        if b == 0:
            order = train.rows.order(epoch, cfg.seed)  # rows past the last full batch wait
        start = time.perf_counter()
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        stats = train_step(actors, cfg, train, ref, idx)
        log.step(step, epoch, stats, time.perf_counter() - start)
        if held_out is not None and (b == per_epoch - 1 or step == total - 1):
            log.eval(step, epoch, evaluate(actors, cfg, held_out, ref_eval))


def main(config: str | None, overrides: list[str]) -> None:
    """`rayrlhf dpo`."""
    train_dpo(load_dpo_config(config, overrides))
