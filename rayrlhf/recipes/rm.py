"""The reward-model driver (`rayrlhf rm`): N DeepSpeed ZeRO-3 ranks of a one-label classifier.

init   a one-label sequence classifier from model_path; a causal LM (e.g. the SFT policy)
       gets a fresh scalar head on its backbone, written to run_dir/init
eval   pairwise accuracy on the train and held-out splits, before training and after
       every epoch (metrics.jsonl + a progress line)
train  per batch of pairs: an equal shard per rank -> Bradley-Terry loss -> one step
save   run_dir/model, an HF sequence-classification model that the PPO reward role loads
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from pydantic import Field
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from rayrlhf.cluster.actors import ActorSet
from rayrlhf.config import load_recipe
from rayrlhf.data.reward_pairs import RewardPairSet, load_reward_pairs
from rayrlhf.data.synthetic import train_and_held_out
from rayrlhf.models.saving import atomic_dir
from rayrlhf.runtime.run_dir import MetricsWriter, write_run_config
from rayrlhf.runtime.zero3_run import (
    TRAINER,
    DataSplitsConfig,
    Zero3RunConfig,
    call_ranks,
    load_splits,
    padded_indices,
    prepare_inputs,
    run_epochs,
    run_group,
)
from rayrlhf.types import shard_rows
from rayrlhf.workers.reward_trainer import RewardTrainerWorker, RMStepStats, mean_rm_stats

DEFAULT_RM_CONFIG = "rm-tiny-cpu.yaml"
CHUNK_PAIRS = 256
"""Pairs per evaluation call (bounds each call's padded batch)."""


class RMDataConfig(DataSplitsConfig):
    """{prompt, chosen, rejected[, margin]} pairs; a numeric `margin` is subtracted from
    r_chosen - r_rejected in the loss. Without eval, accuracy is measured on the train split
    only."""


class RMConfig(Zero3RunConfig):
    SYNTHETIC, ROWS = "synthetic_pairs", "pairs"

    synthetic_pairs: int | None = Field(None, ge=1)
    """Demo only: generate this many training pairs (and 100 held-out ones) into run_dir/data."""
    data: RMDataConfig = RMDataConfig()
    """The preference pairs."""


def load_rm_config(path: str | Path | None = None, overrides: list[str] = ()) -> RMConfig:
    """Load a YAML recipe (default: the embedded tiny RM one), apply overrides, validate."""
    return load_recipe(RMConfig, DEFAULT_RM_CONFIG, path, list(overrides))


# ---- inputs, before Ray starts -------------------------------------------------------------


def is_scalar_classifier(path: str | Path) -> bool:
    """True if `path` holds a one-label *ForSequenceClassification checkpoint."""
    config = AutoConfig.from_pretrained(path)
    archs = config.architectures or []
    return config.num_labels == 1 and any(a.endswith("ForSequenceClassification") for a in archs)


def init_reward_model(model_path: str | Path, out: Path, seed: int) -> Path:
    """`model_path` itself if it is a scalar classifier; else its backbone with a new one-label
    head (seeded), saved with the tokenizer into `out`.

    Built in the checkpoint's own dtype: this runs on the driver (a CPU-only head on a
    cluster), where fp32 doubled a bf16 checkpoint (32 GB for an 8B model). The trainer ranks
    load it in their own dtype anyway."""
    if is_scalar_classifier(model_path):
        return Path(model_path)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=1, dtype="auto"
    )
    with atomic_dir(out) as tmp:  # complete or absent, never config.json alone
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(model_path).save_pretrained(tmp)
    return out


# ---- the phases ----------------------------------------------------------------------------


def evaluate(group: ActorSet, pairs: RewardPairSet, phase: str) -> tuple[float, float]:
    """(mean Bradley-Terry loss, pairwise accuracy) over all of `pairs`, sharded over ranks."""
    n, refs = len(group.actors[TRAINER]), []
    for start in range(0, len(pairs), CHUNK_PAIRS):
        idx = list(range(start, min(start + CHUNK_PAIRS, len(pairs))))
        shards = shard_rows(pairs.batch(padded_indices(idx, n), real=len(idx)), n)
        refs += [a.evaluate.remote(s) for a, s in zip(group.actors[TRAINER], shards)]
    loss, correct, total = (sum(col) for col in zip(*group.get(refs, phase)))
    return loss / total, correct / total


def train_step(group: ActorSet, pairs: RewardPairSet, idx: list[int]) -> RMStepStats:
    """One optimizer step on the pairs `idx`, sharded evenly over the ranks."""
    shards = shard_rows(pairs.batch(idx), len(group.actors[TRAINER]))
    return mean_rm_stats(call_ranks(group, "train_step", shards, "train"))


def log_eval(
    log: MetricsWriter, group: ActorSet, sets: dict[str, RewardPairSet], step: int, epoch: int
) -> dict:
    """Evaluate every split, write one record, print one line; returns the record."""
    rec: dict = {"step": step, "epoch": epoch}
    for split, pairs in sets.items():
        rec[f"{split}/loss"], rec[f"{split}/accuracy"] = evaluate(group, pairs, split)
    log.write(rec)
    accs = " | ".join(f"{s} accuracy {rec[f'{s}/accuracy']:.3f}" for s in sets)
    print(f"eval after epoch {epoch} | {accs}", flush=True)
    return rec


def _step(group: ActorSet, pairs: RewardPairSet, idx: list[int]) -> tuple[dict, str]:
    s = train_step(group, pairs, idx)
    names = ("loss", "accuracy", "chosen_reward", "rejected_reward")
    record = {f"rm/{k}": getattr(s, k) for k in names}
    return record, (
        f"loss {s.loss:.4f} | acc {s.accuracy:.2f} | reward chosen {s.chosen_reward:+.3f} "
        f"rejected {s.rejected_reward:+.3f}"
    )


def _loop(cfg: RMConfig, sets: dict[str, RewardPairSet], group: ActorSet, log: MetricsWriter):
    pairs = sets["train"]
    run_epochs(
        cfg, len(pairs), lambda epoch: pairs.pairs.order(epoch, cfg.seed),
        partial(_step, group, pairs), partial(log_eval, log, group, sets), log,
    )  # fmt: skip


def train_rm(cfg: RMConfig) -> Path:
    """Check inputs, connect to Ray, train the reward model; returns the run directory.

    The model lands in run_dir/model; metrics.jsonl has one record per step and one eval
    record (train/accuracy, eval/accuracy) before training and after each epoch.
    """
    models = {"model_path": cfg.model_path}
    train, held_out = prepare_inputs(cfg, models, cfg.synthetic_pairs, train_and_held_out)
    sets = load_splits(cfg, load_reward_pairs, train, held_out, "pairs")
    run_dir = write_run_config(cfg, cfg.run_dir, keep=[p for p in (train, held_out) if p])
    init = init_reward_model(cfg.model_path, run_dir / "init", cfg.seed)
    loop = partial(_loop, cfg, sets)
    run_group(
        cfg, RewardTrainerWorker, init, loop,
        trainer="reward-model", saved="reward model",
    )  # fmt: skip
    return run_dir


def main(config: str | None, overrides: list[str]) -> None:
    """`rayrlhf rm`."""
    train_rm(load_rm_config(config, overrides))
