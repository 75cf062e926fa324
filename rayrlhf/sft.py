"""The SFT driver (`rayrlhf sft`): N DeepSpeed ZeRO-3 ranks of a causal LM on demonstrations.

eval   mean response-token NLL on the held-out split, before training and after each epoch
train  per batch: an equal shard per rank -> NLL on response tokens only -> one step
save   run_dir/model, an HF causal LM usable as the PPO policy and reference
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, model_validator
from transformers import AutoTokenizer

from rayrlhf.cluster.placement import GroupSpec, connect
from rayrlhf.config import ConfigError, Resources, Section, load_recipe
from rayrlhf.data.demonstrations import SFTSet, load_demonstrations, synthetic_demonstrations
from rayrlhf.data.prompts import DataError
from rayrlhf.types import shard_rows
from rayrlhf.workers.sft import SFTWorker
from rayrlhf.zero3_run import MetricsFile, Zero3Group, padded_indices, start_group

DEFAULT_SFT_CONFIG = "sft-tiny-cpu.yaml"
EVAL_ROWS = 100
"""Held-out demonstrations generated next to `synthetic_demos`."""
CHUNK_ROWS = 256
"""Rows per evaluation call (bounds each call's padded batch)."""


class SFTDataConfig(Section):
    train: str | None = None
    """JSONL of {prompt, response} or {messages: [{role, content}, ...]} rows (unset with
    synthetic_demos). Rendered with the tokenizer's chat template when it has one, else as
    prompt + " " + response."""
    eval: str | None = None
    """JSONL of held-out rows for eval/loss; None skips evaluation."""
    max_len: int = Field(64, ge=2)
    """Most tokens in prompt + response; a longer row is a bad row (file:line)."""


class SFTConfig(Section):
    run_dir: str = "runs/tiny-sft"
    """Output directory: metrics.jsonl, config.yaml, model/ (the fine-tuned policy)."""
    seed: int = 0
    """Seed for row order, initialisation and synthetic data."""
    model_path: str
    """HF directory of the causal LM to fine-tune."""
    num_ranks: int = Field(2, ge=1)
    """DeepSpeed ZeRO-3 data-parallel ranks, one Ray actor each."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per rank per forward/backward pass."""
    lr: float = Field(1e-3, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Global gradient-norm clip."""
    resources: Resources = Resources()
    """Resources of each rank's actor."""
    epochs: int = Field(2, ge=1)
    """Passes over the training rows."""
    batch_size: int = Field(32, ge=1)
    """Rows per optimizer step, over all ranks."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed data row stops the run naming file:line ('error'), or is left out and
    counted ('skip')."""
    synthetic_demos: int | None = Field(None, ge=1)
    """Demo only: generate this many demonstrations (and 100 held-out) into run_dir/data."""
    make_tiny_models: str | None = None
    """Demo only: build the tiny models into this directory first if they are absent."""
    ray_address: str | None = None
    """Ray cluster address; None joins the job's cluster or starts a local one."""
    phase_timeout_s: float = Field(900.0, gt=0)
    """Longest wait for one phase (start-up, train step, eval, save) before an error."""
    placement_timeout_s: float = Field(60.0, gt=0)
    """Longest wait to reserve the ranks' resources before failing with what is missing."""
    data: SFTDataConfig = SFTDataConfig()
    """The demonstrations."""

    @model_validator(mode="after")
    def _consistent(self) -> SFTConfig:
        per_step = self.micro_batch_size * self.num_ranks
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size={self.batch_size} must be divisible by micro_batch_size x "
                f"num_ranks = {per_step}"
            )
        if self.synthetic_demos and (self.data.train or self.data.eval):
            raise ValueError("set synthetic_demos or data.train/data.eval, not both")
        if not self.synthetic_demos and not self.data.train:
            raise ValueError("set data.train (a JSONL file of demonstrations) or synthetic_demos")
        return self


def load_sft_config(path: str | Path | None = None, overrides: list[str] = ()) -> SFTConfig:
    """Load a YAML recipe (default: the embedded tiny SFT one), apply overrides, validate."""
    return load_recipe(SFTConfig, DEFAULT_SFT_CONFIG, path, list(overrides))


def prepare_data(cfg: SFTConfig) -> tuple[Path, Path | None]:
    """Build demo models and rows if asked, check that every path exists: (train, eval)."""
    if cfg.make_tiny_models and not (Path(cfg.make_tiny_models) / "policy/config.json").exists():
        from rayrlhf.models.tiny import make_tiny

        make_tiny(cfg.make_tiny_models)
    train, held_out = cfg.data.train, cfg.data.eval
    if cfg.synthetic_demos:
        from rayrlhf.data.synthetic import write_jsonl

        rows, held_rows = synthetic_demonstrations(cfg.synthetic_demos, EVAL_ROWS, cfg.seed)
        train = write_jsonl(rows, Path(cfg.run_dir) / "data" / "train.jsonl")
        held_out = write_jsonl(held_rows, Path(cfg.run_dir) / "data" / "eval.jsonl")
    paths = {"model_path": cfg.model_path, "data.train": train, "data.eval": held_out}
    for name, value in paths.items():
        if value is not None and not Path(value).exists():
            raise ConfigError(f"invalid config:\n  {name}: path does not exist: {value}")
    return Path(train), Path(held_out) if held_out else None


def evaluate(group: Zero3Group, rows: SFTSet) -> float:
    """Mean response-token NLL over all of `rows`; repeats that pad shards carry no tokens."""
    n, refs = len(group.ranks), []
    for start in range(0, len(rows), CHUNK_ROWS):
        idx = list(range(start, min(start + CHUNK_ROWS, len(rows))))
        batch = rows.batch(padded_indices(idx, n))
        mask = batch.action_mask.clone()
        mask[len(idx) :] = 0
        refs += [
            a.evaluate.remote(s)
            for a, s in zip(group.ranks, shard_rows(replace(batch, action_mask=mask), n))
        ]
    nll, tokens = (sum(col) for col in zip(*group.get(refs, "eval")))
    return nll / max(tokens, 1)


def _log_eval(log: MetricsFile, group: Zero3Group, held_out: SFTSet, step: int, epoch: int):
    loss = evaluate(group, held_out)
    log.write({"step": step, "epoch": epoch, "eval/loss": loss})
    print(f"eval after epoch {epoch} | held-out loss {loss:.4f}", flush=True)


def _loop(cfg: SFTConfig, group: Zero3Group, rows: SFTSet, held_out: SFTSet | None, log):
    per_epoch = len(rows) // cfg.batch_size
    total, start = cfg.epochs * per_epoch, time.time()
    if held_out is not None:
        _log_eval(log, group, held_out, 0, 0)
    for epoch in range(cfg.epochs):
        order = rows.order(epoch, cfg.seed)  # the last partial batch waits for the next epoch
        for b in range(per_epoch):
            step, t0 = epoch * per_epoch + b, time.perf_counter()
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            stats = group.call("train_step", shard_rows(rows.batch(idx), cfg.num_ranks), "train")
            tokens = sum(s.tokens for s in stats)
            loss = sum(s.loss * s.tokens for s in stats) / max(tokens, 1)
            seconds = time.perf_counter() - t0
            log.write({"step": step + 1, "epoch": epoch, "sft/loss": loss,
                       "sft/tokens": tokens, "time/step": seconds})  # fmt: skip
            eta = (time.time() - start) / (step + 1) * (total - step - 1)
            print(
                f"step {step + 1}/{total} | loss {loss:.4f} | {tokens} tokens | "
                f"step {seconds:.2f}s | eta {eta:.0f}s",
                flush=True,
            )
        if held_out is not None:
            _log_eval(log, group, held_out, (epoch + 1) * per_epoch, epoch + 1)


def train_sft(cfg: SFTConfig) -> Path:
    """Check inputs, connect to Ray, fine-tune; returns the run directory (model in model/)."""
    train_path, eval_path = prepare_data(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    rows = load_demonstrations(train_path, tokenizer, cfg.data.max_len, cfg.on_bad_row)
    held_out = (
        load_demonstrations(eval_path, tokenizer, cfg.data.max_len, cfg.on_bad_row)
        if eval_path
        else None
    )
    for split, s in (("train", rows), ("eval", held_out)):
        if s is not None and s.skipped:
            print(f"{split}: skipped {s.skipped} bad row(s) (on_bad_row=skip)", flush=True)
    if len(rows) < cfg.batch_size:
        raise ConfigError(
            f"invalid config:\n  batch_size: {cfg.batch_size} is more than the {len(rows)} "
            f"rows in {train_path}"
        )
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    connect(cfg.ray_address, cfg.num_ranks * cfg.resources.num_cpus)
    accum = cfg.batch_size // (cfg.num_ranks * cfg.micro_batch_size)
    spec = GroupSpec(
        cfg.model_path, cfg.num_ranks, cfg.micro_batch_size, accum, cfg.lr, cfg.weight_decay,
        cfg.grad_clip, cfg.seed, cfg.resources,
    )  # fmt: skip
    print(f"starting SFT trainer: x{cfg.num_ranks} ZeRO-3 ranks", flush=True)
    group = Zero3Group(cfg.phase_timeout_s)
    try:
        start_group(SFTWorker, "sft", spec, group, cfg.placement_timeout_s)
        _loop(cfg, group, rows, held_out, MetricsFile(run_dir))
        group.save(run_dir / "model")
        print(f"SFT policy (HF format): {run_dir / 'model'}", flush=True)
    finally:
        group.shutdown()
    return run_dir


def sft_main(config: str | None, overrides: list[str]) -> int:
    """`rayrlhf sft`: exit 0 on success, 2 on bad input found before Ray starts."""
    try:
        train_sft(load_sft_config(config, overrides))
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"rayrlhf: {err}", file=sys.stderr)
        return 2
    return 0
