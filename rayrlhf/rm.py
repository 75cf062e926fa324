"""The reward-model driver (`rayrlhf rm`): N DeepSpeed ZeRO-3 ranks of a one-label classifier.

init   a one-label sequence classifier from model_path; a causal LM (e.g. the SFT policy)
       gets a fresh scalar head on its backbone, written to run_dir/init
eval   pairwise accuracy on the train and held-out splits, before training and after
       every epoch (metrics.jsonl + a progress line)
train  per batch of pairs: an equal shard per rank -> Bradley-Terry loss -> one step
save   run_dir/model, an HF sequence-classification model that the PPO reward role loads
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import Field, model_validator
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from rayrlhf.cluster.placement import GroupSpec, connect
from rayrlhf.config import ConfigError, Resources, Section, load_recipe
from rayrlhf.data.prompts import DataError
from rayrlhf.data.reward_pairs import RewardPairSet, load_reward_pairs
from rayrlhf.types import shard_rows
from rayrlhf.workers.reward_trainer import RewardTrainerWorker, RMStepStats, mean_rm_stats
from rayrlhf.zero3_run import MetricsFile, Zero3Group, padded_indices, start_group

DEFAULT_RM_CONFIG = "rm-tiny-cpu.yaml"
EVAL_PAIRS = 100
"""Held-out pairs generated next to `synthetic_pairs`."""
CHUNK_PAIRS = 256
"""Pairs per evaluation call (bounds each call's padded batch)."""


class RMDataConfig(Section):
    train: str | None = None
    """JSONL file of {prompt, chosen, rejected[, margin]} training pairs (unset with
    synthetic_pairs). A numeric `margin` is subtracted from r_chosen - r_rejected in the loss."""
    eval: str | None = None
    """JSONL file of held-out pairs for eval/accuracy; None evaluates on the train split only."""
    max_len: int = Field(64, ge=2)
    """Most tokens in prompt + response (either side); a longer pair is a bad row (file:line)."""


class RMConfig(Section):
    run_dir: str = "runs/tiny-rm"
    """Output directory: metrics.jsonl, config.yaml, model/ (the trained reward model)."""
    seed: int = 0
    """Seed for pair order, the new score head and synthetic data."""
    model_path: str
    """HF directory to start from: a one-label sequence classifier, or a causal LM whose
    backbone gets a fresh scalar head."""
    num_ranks: int = Field(2, ge=1)
    """DeepSpeed ZeRO-3 data-parallel ranks, one Ray actor each."""
    micro_batch_size: int = Field(8, ge=1)
    """Pairs per rank per forward/backward pass (2x sequences)."""
    lr: float = Field(1e-3, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Global gradient-norm clip."""
    resources: Resources = Resources()
    """Resources of each rank's actor."""
    epochs: int = Field(2, ge=1)
    """Passes over the training pairs."""
    batch_size: int = Field(32, ge=1)
    """Pairs per optimizer step, over all ranks."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed data row stops the run naming file:line ('error'), or is left out and
    counted ('skip')."""
    synthetic_pairs: int | None = Field(None, ge=1)
    """Demo only: generate this many training pairs (and 100 held-out ones) into run_dir/data."""
    make_tiny_models: str | None = None
    """Demo only: build the tiny models into this directory first if they are absent."""
    ray_address: str | None = None
    """Ray cluster address; None joins the job's cluster or starts a local one."""
    phase_timeout_s: float = Field(900.0, gt=0)
    """Longest wait for one phase (start-up, train step, eval, save) before an error."""
    placement_timeout_s: float = Field(60.0, gt=0)
    """Longest wait to reserve the ranks' resources before failing with what is missing."""
    data: RMDataConfig = RMDataConfig()
    """The preference pairs."""

    @model_validator(mode="after")
    def _consistent(self) -> RMConfig:
        per_step = self.micro_batch_size * self.num_ranks
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size={self.batch_size} must be divisible by micro_batch_size x "
                f"num_ranks = {per_step}"
            )
        if self.synthetic_pairs and (self.data.train or self.data.eval):
            raise ValueError("set synthetic_pairs or data.train/data.eval, not both")
        if not self.synthetic_pairs and not self.data.train:
            raise ValueError("set data.train (a JSONL file of pairs) or synthetic_pairs")
        return self


def load_rm_config(path: str | Path | None = None, overrides: list[str] = ()) -> RMConfig:
    """Load a YAML recipe (default: the embedded tiny RM one), apply overrides, validate."""
    return load_recipe(RMConfig, DEFAULT_RM_CONFIG, path, list(overrides))


# ---- inputs, before Ray starts -------------------------------------------------------------


def prepare_data(cfg: RMConfig) -> tuple[Path, Path | None]:
    """Build demo models and pairs if asked, check that every path exists: (train, eval)."""
    if cfg.make_tiny_models and not (Path(cfg.make_tiny_models) / "policy/config.json").exists():
        from rayrlhf.models.tiny import make_tiny

        make_tiny(cfg.make_tiny_models)
    train, held_out = cfg.data.train, cfg.data.eval
    if cfg.synthetic_pairs:
        from rayrlhf.data.synthetic import train_and_held_out, write_jsonl

        rows, held_rows = train_and_held_out(cfg.synthetic_pairs, EVAL_PAIRS, cfg.seed)
        train = write_jsonl(rows, Path(cfg.run_dir) / "data" / "train.jsonl")
        held_out = write_jsonl(held_rows, Path(cfg.run_dir) / "data" / "eval.jsonl")
    paths = {"model_path": cfg.model_path, "data.train": train, "data.eval": held_out}
    for name, value in paths.items():
        if value is not None and not Path(value).exists():
            raise ConfigError(f"invalid config:\n  {name}: path does not exist: {value}")
    return Path(train), Path(held_out) if held_out else None


def is_scalar_classifier(path: str | Path) -> bool:
    """True if `path` holds a one-label *ForSequenceClassification checkpoint."""
    config = AutoConfig.from_pretrained(path)
    archs = config.architectures or []
    return config.num_labels == 1 and any(a.endswith("ForSequenceClassification") for a in archs)


def init_reward_model(model_path: str | Path, out: Path, seed: int) -> Path:
    """`model_path` itself if it is a scalar classifier; else its backbone with a new one-label
    head (seeded), saved with the tokenizer into `out`."""
    if is_scalar_classifier(model_path):
        return Path(model_path)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=1, dtype=torch.float32
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)
    return out


# ---- the phases ----------------------------------------------------------------------------


def evaluate(group: Zero3Group, pairs: RewardPairSet, phase: str) -> tuple[float, float]:
    """(mean Bradley-Terry loss, pairwise accuracy) over all of `pairs`, sharded over ranks."""
    n, refs = len(group.ranks), []
    for start in range(0, len(pairs), CHUNK_PAIRS):
        idx = list(range(start, min(start + CHUNK_PAIRS, len(pairs))))
        shards = shard_rows(pairs.batch(padded_indices(idx, n), real=len(idx)), n)
        refs += [a.evaluate.remote(s) for a, s in zip(group.ranks, shards)]
    loss, correct, total = (sum(col) for col in zip(*group.get(refs, phase)))
    return loss / total, correct / total


def train_step(group: Zero3Group, pairs: RewardPairSet, idx: list[int]) -> RMStepStats:
    """One optimizer step on the pairs `idx`, sharded evenly over the ranks."""
    shards = shard_rows(pairs.batch(idx), len(group.ranks))
    return mean_rm_stats(group.call("train_step", shards, "train"))


def log_eval(
    log: MetricsFile, group: Zero3Group, sets: dict[str, RewardPairSet], step: int, epoch: int
) -> dict:
    """Evaluate every split, write one record, print one line; returns the record."""
    rec: dict = {"step": step, "epoch": epoch}
    for split, pairs in sets.items():
        rec[f"{split}/loss"], rec[f"{split}/accuracy"] = evaluate(group, pairs, split)
    log.write(rec)
    accs = " | ".join(f"{s} accuracy {rec[f'{s}/accuracy']:.3f}" for s in sets)
    print(f"eval after epoch {epoch} | {accs}", flush=True)
    return rec


def _loop(cfg: RMConfig, group: Zero3Group, sets: dict[str, RewardPairSet], log: MetricsFile):
    pairs = sets["train"]
    per_epoch = len(pairs) // cfg.batch_size
    total, start = cfg.epochs * per_epoch, time.time()
    log_eval(log, group, sets, 0, 0)
    for epoch in range(cfg.epochs):
        order = pairs.pairs.order(epoch, cfg.seed)  # the last partial batch waits for next epoch
        for b in range(per_epoch):
            step, t0 = epoch * per_epoch + b, time.perf_counter()
            s = train_step(group, pairs, order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
            seconds = time.perf_counter() - t0
            log.write({"step": step + 1, "epoch": epoch, "rm/loss": s.loss,
                       "rm/accuracy": s.accuracy, "rm/chosen_reward": s.chosen_reward,
                       "rm/rejected_reward": s.rejected_reward, "time/step": seconds})  # fmt: skip
            eta = (time.time() - start) / (step + 1) * (total - step - 1)
            print(
                f"step {step + 1}/{total} | loss {s.loss:.4f} | acc {s.accuracy:.2f} | reward "
                f"chosen {s.chosen_reward:+.3f} rejected {s.rejected_reward:+.3f} | "
                f"step {seconds:.2f}s | eta {eta:.0f}s",
                flush=True,
            )
        log_eval(log, group, sets, (epoch + 1) * per_epoch, epoch + 1)


def train_rm(cfg: RMConfig) -> Path:
    """Check inputs, connect to Ray, train the reward model; returns the run directory.

    The model lands in run_dir/model; metrics.jsonl has one record per step and one eval
    record (train/accuracy, eval/accuracy) before training and after each epoch.
    """
    train_path, eval_path = prepare_data(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    sets = {"train": load_reward_pairs(train_path, tokenizer, cfg.data.max_len, cfg.on_bad_row)}
    if eval_path:
        sets["eval"] = load_reward_pairs(eval_path, tokenizer, cfg.data.max_len, cfg.on_bad_row)
    for split, pairs in sets.items():
        if pairs.skipped:
            print(f"{split}: skipped {pairs.skipped} bad row(s) (on_bad_row=skip)", flush=True)
    if len(sets["train"]) < cfg.batch_size:
        raise ConfigError(
            f"invalid config:\n  batch_size: {cfg.batch_size} is more than the "
            f"{len(sets['train'])} pairs in {train_path}"
        )
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    init = init_reward_model(cfg.model_path, run_dir / "init", cfg.seed)
    connect(cfg.ray_address, cfg.num_ranks * cfg.resources.num_cpus)
    accum = cfg.batch_size // (cfg.num_ranks * cfg.micro_batch_size)
    spec = GroupSpec(
        str(init), cfg.num_ranks, cfg.micro_batch_size, accum, cfg.lr, cfg.weight_decay,
        cfg.grad_clip, cfg.seed, cfg.resources,
    )  # fmt: skip
    print(f"starting reward-model trainer: x{cfg.num_ranks} ZeRO-3 ranks", flush=True)
    group = Zero3Group(cfg.phase_timeout_s)
    try:
        start_group(RewardTrainerWorker, "reward-trainer", spec, group, cfg.placement_timeout_s)
        _loop(cfg, group, sets, MetricsFile(run_dir))
        group.save(run_dir / "model")
        print(f"reward model (HF format): {run_dir / 'model'}", flush=True)
    finally:
        group.shutdown()
    return run_dir


def rm_main(config: str | None, overrides: list[str]) -> int:
    """`rayrlhf rm`: exit 0 on success, 2 on bad input found before Ray starts."""
    try:
        train_rm(load_rm_config(config, overrides))
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"rayrlhf: {err}", file=sys.stderr)
        return 2
    return 0
