"""The SFT driver (`rayrlhf sft`): N DeepSpeed ZeRO-3 ranks of a causal LM on demonstrations.

eval   mean response-token NLL on the held-out split, before training and after each epoch
train  per batch: an equal shard per rank -> NLL on response tokens only -> one step
save   run_dir/model, an HF causal LM usable as the PPO policy and reference
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

from pydantic import Field

from rayrlhf.cluster.actors import ActorSet
from rayrlhf.config import load_recipe
from rayrlhf.data.demonstrations import SFTSet, load_demonstrations, synthetic_demonstrations
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
from rayrlhf.workers.sft import SFTWorker

DEFAULT_SFT_CONFIG = "sft-tiny-cpu.yaml"
CHUNK_ROWS = 256
"""Rows per evaluation call (bounds each call's padded batch)."""


class SFTDataConfig(DataSplitsConfig):
    """{prompt, response} or {messages: [{role, content}, ...]} rows, rendered with the
    tokenizer's chat template when it has one, else as prompt + " " + response. Without eval,
    no evaluation."""


class SFTConfig(Zero3RunConfig):
    SYNTHETIC, ROWS = "synthetic_demos", "demonstrations"

    synthetic_demos: int | None = Field(None, ge=1)
    """Demo only: generate this many demonstrations (and 100 held-out) into run_dir/data."""
    data: SFTDataConfig = SFTDataConfig()
    """The demonstrations."""


def load_sft_config(path: str | Path | None = None, overrides: list[str] = ()) -> SFTConfig:
    """Load a YAML recipe (default: the embedded tiny SFT one), apply overrides, validate."""
    return load_recipe(SFTConfig, DEFAULT_SFT_CONFIG, path, list(overrides))


def evaluate(group: ActorSet, rows: SFTSet) -> float:
    """Mean response-token NLL over all of `rows`; repeats that pad shards carry no tokens."""
    n, refs = len(group.actors[TRAINER]), []
    for start in range(0, len(rows), CHUNK_ROWS):
        idx = list(range(start, min(start + CHUNK_ROWS, len(rows))))
        batch = rows.batch(padded_indices(idx, n))
        mask = batch.action_mask.clone()
        mask[len(idx) :] = 0
        refs += [
            a.evaluate.remote(s)
            for a, s in zip(group.actors[TRAINER], shard_rows(replace(batch, action_mask=mask), n))
        ]
    nll, tokens = (sum(col) for col in zip(*group.get(refs, "eval")))
    return nll / max(tokens, 1)


def _log_eval(log: MetricsWriter, group: ActorSet, held_out: SFTSet, step: int, epoch: int):
    loss = evaluate(group, held_out)
    log.write({"step": step, "epoch": epoch, "eval/loss": loss})
    print(f"eval after epoch {epoch} | held-out loss {loss:.4f}", flush=True)


def _step(group: ActorSet, rows: SFTSet, idx: list[int]) -> tuple[dict, str]:
    stats = call_ranks(
        group, "train_step", shard_rows(rows.batch(idx), len(group.actors[TRAINER])), "train"
    )
    tokens = sum(s.tokens for s in stats)
    loss = sum(s.loss * s.tokens for s in stats) / max(tokens, 1)
    return {"sft/loss": loss, "sft/tokens": tokens}, f"loss {loss:.4f} | {tokens} tokens"


def _loop(cfg: SFTConfig, sets: dict[str, SFTSet], group: ActorSet, log: MetricsWriter):
    rows, held_out = sets["train"], sets.get("eval")
    evaluate = None if held_out is None else partial(_log_eval, log, group, held_out)
    run_epochs(
        cfg, len(rows), lambda epoch: rows.order(epoch, cfg.seed), partial(_step, group, rows),
        evaluate, log,
    )  # fmt: skip


def train_sft(cfg: SFTConfig) -> Path:
    """Check inputs, connect to Ray, fine-tune; returns the run directory (model in model/)."""
    models = {"model_path": cfg.model_path}
    train, held_out = prepare_inputs(cfg, models, cfg.synthetic_demos, synthetic_demonstrations)
    sets = load_splits(cfg, load_demonstrations, train, held_out, "rows")
    run_dir = write_run_config(cfg, cfg.run_dir, keep=[p for p in (train, held_out) if p])
    loop = partial(_loop, cfg, sets)
    run_group(cfg, SFTWorker, cfg.model_path, loop, trainer="SFT", saved="SFT policy")
    return run_dir


def main(config: str | None, overrides: list[str]) -> None:
    """`rayrlhf sft`."""
    train_sft(load_sft_config(config, overrides))
