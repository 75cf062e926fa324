"""What the single-role trainers (`rayrlhf sft`, `rayrlhf rm`) share: their common settings, the
input checks before Ray starts (`rayrlhf dpo` uses these too), one ZeRO-3 group on Ray and the
epoch loop.

A group is N rank actors in one placement group, held by an `ActorSet`: every wait is bounded
by the phase timeout and names the phase, and the actors are released however the run ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator
from transformers import AutoTokenizer

from rayrlhf.cluster.actors import ActorSet
from rayrlhf.cluster.placement import start_ray
from rayrlhf.config import ConfigError, OnBadRow, RankGroupConfig, RayRunConfig, Section
from rayrlhf.runtime.preflight import check_data_path, check_model_dir
from rayrlhf.runtime.run_dir import MetricsWriter, build_tiny_models, check_run_dir

EVAL_ROWS = 100
"""Held-out rows generated next to the synthetic training ones (SFT, RM and DPO demos)."""
TRAINER = "trainer"
"""The role name of the one ZeRO-3 group in an `ActorSet` of `run_group`."""


class Zero3RunConfig(RayRunConfig, RankGroupConfig):
    """The settings of `rayrlhf sft` and `rayrlhf rm`: one ZeRO-3 group trained for some epochs;
    each adds its synthetic-data count and its data section. model_path is where training
    starts: SFT fine-tunes a causal LM; the RM takes a one-label sequence classifier, or a causal
    LM whose backbone gets a fresh scalar head."""

    epochs: int = Field(2, ge=1)
    """Passes over the training examples."""
    batch_size: int = Field(32, ge=1)
    """Examples (SFT rows, RM pairs) per optimizer step, over all ranks."""
    on_bad_row: OnBadRow = "error"
    """A malformed data row stops the run naming file:line or its row ('error'), or is left
    out and counted ('skip')."""

    SYNTHETIC: ClassVar[str]
    """Name of the subclass's field that asks for synthetic training data instead of a file."""
    ROWS: ClassVar[str]
    """What a row of data.train holds, for the errors."""

    @model_validator(mode="after")
    def _consistent(self) -> Zero3RunConfig:
        per_step = self.micro_batch_size * self.num_ranks
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size={self.batch_size} must be divisible by micro_batch_size x "
                f"num_ranks = {per_step}"
            )
        check_data_source(self.SYNTHETIC, getattr(self, self.SYNTHETIC), self.data, self.ROWS)
        return self


class DataSplitsConfig(Section):
    """Where a trainer's examples come from; each recipe's subclass says what a row holds."""

    train: str | None = None
    """Training rows: a JSONL file, a parquet file or a `datasets.save_to_disk` directory
    (unset when the recipe generates synthetic ones)."""
    eval: str | None = None
    """Held-out rows for evaluation, in any of train's formats; None skips it."""
    max_len: int = Field(64, ge=2)
    """Most tokens in prompt + response (either side of a pair); a longer row is a bad row,
    named by file:line or its row."""


def check_data_source(synthetic: str, count: int | None, data: DataSplitsConfig, rows: str) -> None:
    """Exactly one source of training data: the field `synthetic` (its value `count`) or
    data.train; `rows` names what data.train holds, for the error."""
    if count and (data.train or data.eval):
        raise ValueError(f"set {synthetic} or data.train/data.eval, not both")
    if not count and not data.train:
        raise ValueError(f"set data.train (a file or dataset of {rows}) or {synthetic}")


# ---- inputs, before Ray starts -------------------------------------------------------------


def prepare_inputs(
    cfg: Section, models: dict[str, str | None], synthetic: int | None, generate: Callable
) -> tuple[Path, Path | None]:
    """Build demo models and data if asked, check that every path exists: (train, eval).

    `cfg` has make_tiny_models, run_dir, seed and data.train/eval; `models` maps config names
    to model directories; `generate(n, n_eval, seed)` returns (train rows, held-out rows).
    """
    check_run_dir(cfg)  # before the synthetic data below is written into it
    build_tiny_models(cfg.make_tiny_models, cfg.make_tiny_size)
    train, held_out = cfg.data.train, cfg.data.eval
    if synthetic:
        from rayrlhf.data.synthetic import write_jsonl

        rows, held_rows = generate(synthetic, EVAL_ROWS, cfg.seed)
        train = write_jsonl(rows, Path(cfg.run_dir) / "data" / "train.jsonl")
        held_out = write_jsonl(held_rows, Path(cfg.run_dir) / "data" / "eval.jsonl")
    for name, value in models.items():
        if value is not None:
            check_model_dir(name, value)
    for name, value in {"data.train": train, "data.eval": held_out}.items():
        if value is not None:
            check_data_path(name, value)
    return Path(train), Path(held_out) if held_out else None


def load_splits(
    cfg: Zero3RunConfig, load: Callable, train: Path, held_out: Path | None, rows: str
) -> dict:
    """{"train": set[, "eval": set]}, each `load(path, tokenizer, max_len, on_bad_row)`; reports
    skipped rows and checks that the train split fills a batch (`rows` names its examples)."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    sets = {"train": load(train, tokenizer, cfg.data.max_len, cfg.on_bad_row)}
    if held_out:
        sets["eval"] = load(held_out, tokenizer, cfg.data.max_len, cfg.on_bad_row)
    for split, examples in sets.items():
        if examples.skipped:
            print(f"{split}: skipped {examples.skipped} bad row(s) (on_bad_row=skip)", flush=True)
    if len(sets["train"]) < cfg.batch_size:
        raise ConfigError(
            f"invalid config:\n  batch_size: {cfg.batch_size} is more than the "
            f"{len(sets['train'])} {rows} in {train}"
        )
    return sets


# ---- the group -----------------------------------------------------------------------------


def call_ranks(actors: ActorSet, method: str, shards: list, phase: str) -> list:
    """Call `method` on every trainer rank with its shard (collective), wait, return results."""
    refs = [getattr(a, method).remote(s) for a, s in zip(actors.actors[TRAINER], shards)]
    return actors.get(refs, phase)


def padded_indices(idx: list[int], n: int) -> list[int]:
    """`idx` with rows repeated until its length divides by `n` (ZeRO-3 needs equal shards)."""
    return idx + [idx[i % len(idx)] for i in range(-len(idx) % n)]


# ---- the run -------------------------------------------------------------------------------


def run_group(
    cfg: Zero3RunConfig,
    cls: type,
    model_path: str | Path,
    loop: Callable[[ActorSet, MetricsWriter], None],
    *,
    trainer: str,
    saved: str,
) -> None:
    """Connect to Ray, start `cfg.num_ranks` actors of `cls` on `model_path`, run `loop`, save
    run_dir/model; the actors are released however it ends. `trainer` and `saved` name the
    trainer and the saved model in the progress lines."""
    run_dir = Path(cfg.run_dir)
    start_ray(cfg.ray_address, cfg.num_ranks * cfg.resources.num_cpus)
    accum = cfg.batch_size // (cfg.num_ranks * cfg.micro_batch_size)
    group = cfg.model_copy(update={"model_path": str(model_path)})  # the RM starts from init/
    print(f"starting {trainer} trainer: x{cfg.num_ranks} ZeRO-3 ranks", flush=True)
    with ActorSet(cfg.phase_timeout_s, cfg.placement_timeout_s) as actors:
        ranks = actors.start_zero3(TRAINER, cls, group, accum, cfg.seed)
        actors.wait_ready()
        loop(actors, MetricsWriter(run_dir))
        actors.get([a.save.remote(str(run_dir / "model")) for a in ranks], "save")
        print(f"{saved} (HF format): {run_dir / 'model'}", flush=True)


def run_epochs(
    cfg: Zero3RunConfig,
    size: int,
    order: Callable[[int], list[int]],
    step: Callable[[list[int]], tuple[dict, str]],
    evaluate: Callable[[int, int], None] | None,
    log: MetricsWriter,
) -> None:
    """`cfg.epochs` passes of full batches over `size` examples, one record and line per step.

    order(epoch) shuffles the indices; step(idx) takes one optimizer step and returns (metrics,
    progress text); evaluate(step, epoch), if given, runs before training and after each epoch.
    """
    per_epoch = size // cfg.batch_size
    total, start = cfg.epochs * per_epoch, time.time()
    if evaluate is not None:
        evaluate(0, 0)
    for epoch in range(cfg.epochs):
        shuffled = order(epoch)  # the last partial batch waits for the next epoch
        for b in range(per_epoch):
            n, t0 = epoch * per_epoch + b, time.perf_counter()
            record, text = step(shuffled[b * cfg.batch_size : (b + 1) * cfg.batch_size])
            seconds = time.perf_counter() - t0
            log.write({"step": n + 1, "epoch": epoch, **record, "time/step": seconds})
            eta = (time.time() - start) / (n + 1) * (total - n - 1)
            print(
                f"step {n + 1}/{total} | {text} | step {seconds:.2f}s | eta {eta:.0f}s",
                flush=True,
            )
        if evaluate is not None:
            evaluate((epoch + 1) * per_epoch, epoch + 1)
