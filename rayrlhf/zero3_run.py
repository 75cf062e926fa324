"""What the single-role trainers (`rayrlhf sft`, `rayrlhf rm`) share: their common settings, the
input checks before Ray starts (`rayrlhf dpo` uses these too), one ZeRO-3 group on Ray and the
epoch loop.

A group is N rank actors in one placement group. Every wait is bounded by the phase timeout and
a timeout names the phase, as in the PPO and DPO drivers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import ray
import yaml
from pydantic import Field, model_validator
from ray.util.placement_group import remove_placement_group
from transformers import AutoTokenizer

from rayrlhf.cluster.placement import GroupSpec, connect, reserve, start_zero3_ranks
from rayrlhf.cluster.waits import bounded_get
from rayrlhf.config import ConfigError, Resources, Section

EVAL_ROWS = 100
"""Held-out rows generated next to the synthetic training ones (SFT, RM and DPO demos)."""


class Zero3RunConfig(Section):
    """The settings of `rayrlhf sft` and `rayrlhf rm`; each adds run_dir's default, its
    synthetic-data count and its data section."""

    run_dir: str
    """Output directory: metrics.jsonl, config.yaml, model/ (the trained model)."""
    seed: int = 0
    """Seed for example order, initialisation (the RM's new score head) and synthetic data."""
    model_path: str
    """HF directory to start from: SFT fine-tunes a causal LM; the RM takes a one-label sequence
    classifier, or a causal LM whose backbone gets a fresh scalar head."""
    num_ranks: int = Field(2, ge=1)
    """DeepSpeed ZeRO-3 data-parallel ranks, one Ray actor each."""
    micro_batch_size: int = Field(8, ge=1)
    """Examples per rank per forward/backward pass: SFT sequences, or RM pairs (2x sequences)."""
    lr: float = Field(1e-3, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Global gradient-norm clip."""
    resources: Resources = Resources()
    """Resources of each rank's actor."""
    epochs: int = Field(2, ge=1)
    """Passes over the training examples."""
    batch_size: int = Field(32, ge=1)
    """Examples (SFT rows, RM pairs) per optimizer step, over all ranks."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed data row stops the run naming file:line ('error'), or is left out and
    counted ('skip')."""
    ray_address: str | None = None
    """Ray cluster address; None joins the job's cluster or starts a local one."""
    phase_timeout_s: float = Field(900.0, gt=0)
    """Longest wait for one phase (start-up, train step, eval, save) before an error."""
    placement_timeout_s: float = Field(60.0, gt=0)
    """Longest wait to reserve the ranks' resources before failing with what is missing."""
    make_tiny_models: str | None = None
    """Demo only: build the tiny models into this directory first if they are absent."""

    @model_validator(mode="after")
    def _batches_divide(self) -> Zero3RunConfig:
        per_step = self.micro_batch_size * self.num_ranks
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size={self.batch_size} must be divisible by micro_batch_size x "
                f"num_ranks = {per_step}"
            )
        return self


def check_data_source(synthetic: str, count: int | None, data: Section, rows: str) -> None:
    """Exactly one source of training data: the field `synthetic` (its value `count`) or
    data.train; `rows` names what data.train holds, for the error."""
    if count and (data.train or data.eval):
        raise ValueError(f"set {synthetic} or data.train/data.eval, not both")
    if not count and not data.train:
        raise ValueError(f"set data.train (a JSONL file of {rows}) or {synthetic}")


# ---- inputs, before Ray starts -------------------------------------------------------------


def prepare_inputs(
    cfg: Section, models: dict[str, str | None], synthetic: int | None, generate: Callable
) -> tuple[Path, Path | None]:
    """Build demo models and data if asked, check that every path exists: (train, eval).

    `cfg` has make_tiny_models, run_dir, seed and data.train/eval; `models` maps config names
    to model directories; `generate(n, n_eval, seed)` returns (train rows, held-out rows).
    """
    if cfg.make_tiny_models and not (Path(cfg.make_tiny_models) / "policy/config.json").exists():
        from rayrlhf.models.tiny import make_tiny

        make_tiny(cfg.make_tiny_models)
    train, held_out = cfg.data.train, cfg.data.eval
    if synthetic:
        from rayrlhf.data.synthetic import write_jsonl

        rows, held_rows = generate(synthetic, EVAL_ROWS, cfg.seed)
        train = write_jsonl(rows, Path(cfg.run_dir) / "data" / "train.jsonl")
        held_out = write_jsonl(held_rows, Path(cfg.run_dir) / "data" / "eval.jsonl")
    paths = {**models, "data.train": train, "data.eval": held_out}
    for name, value in paths.items():
        if value is not None and not Path(value).exists():
            raise ConfigError(f"invalid config:\n  {name}: path does not exist: {value}")
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


def write_run_config(cfg: Zero3RunConfig) -> Path:
    """Create run_dir and record the validated config there; returns run_dir."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return run_dir


# ---- the group -----------------------------------------------------------------------------


@dataclass
class Zero3Group:
    """The rank actors of one role and their placement group."""

    timeout: float
    ranks: list = field(default_factory=list)
    placement_groups: list = field(default_factory=list)

    def get(self, refs, phase: str):
        """`ray.get` bounded by the phase timeout, with an error that names the phase."""
        return bounded_get(refs, self.timeout, phase)

    def call(self, method: str, shards: list, phase: str) -> list:
        """Call `method` on every rank with its shard (collective), wait, return the results."""
        refs = [getattr(a, method).remote(s) for a, s in zip(self.ranks, shards)]
        return self.get(refs, phase)

    def save(self, path: Path) -> None:
        self.get([a.save.remote(str(path)) for a in self.ranks], "save")

    def shutdown(self) -> None:
        for actor in self.ranks:
            ray.kill(actor)
        for pg in self.placement_groups:
            remove_placement_group(pg)
        self.ranks.clear()
        self.placement_groups.clear()


def start_group(cls: type, role: str, spec: GroupSpec, group: Zero3Group, wait_s: float) -> None:
    """Reserve bundles and start `spec.num_ranks` actors of `cls`; fills `group` as it goes,
    so the caller's `shutdown` also cleans up a failed start."""
    pg = reserve(role, spec.resources, spec.num_ranks, wait_s)
    group.placement_groups.append(pg)
    group.ranks.extend(start_zero3_ranks(cls, pg, spec))
    group.get([a.__ray_ready__.remote() for a in group.ranks], "start-up")


def padded_indices(idx: list[int], n: int) -> list[int]:
    """`idx` with rows repeated until its length divides by `n` (ZeRO-3 needs equal shards)."""
    return idx + [idx[i % len(idx)] for i in range(-len(idx) % n)]


class MetricsFile:
    """Appends one JSON record per line to run_dir/metrics.jsonl (started afresh)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


# ---- the run -------------------------------------------------------------------------------


def run_group(
    cfg: Zero3RunConfig,
    cls: type,
    role: str,
    model_path: str | Path,
    loop: Callable[[Zero3Group, MetricsFile], None],
    *,
    trainer: str,
    saved: str,
) -> None:
    """Connect to Ray, start `cfg.num_ranks` actors of `cls` on `model_path`, run `loop`, save
    run_dir/model; the actors are released however it ends. `trainer` and `saved` name the
    trainer and the saved model in the progress lines."""
    run_dir = Path(cfg.run_dir)
    connect(cfg.ray_address, cfg.num_ranks * cfg.resources.num_cpus)
    accum = cfg.batch_size // (cfg.num_ranks * cfg.micro_batch_size)
    spec = GroupSpec(
        str(model_path), cfg.num_ranks, cfg.micro_batch_size, accum, cfg.lr, cfg.weight_decay,
        cfg.grad_clip, cfg.seed, cfg.resources,
    )  # fmt: skip
    print(f"starting {trainer} trainer: x{cfg.num_ranks} ZeRO-3 ranks", flush=True)
    group = Zero3Group(cfg.phase_timeout_s)
    try:
        start_group(cls, role, spec, group, cfg.placement_timeout_s)
        loop(group, MetricsFile(run_dir))
        group.save(run_dir / "model")
        print(f"{saved} (HF format): {run_dir / 'model'}", flush=True)
    finally:
        group.shutdown()


def run_epochs(
    cfg: Zero3RunConfig,
    size: int,
    order: Callable[[int], list[int]],
    step: Callable[[list[int]], tuple[dict, str]],
    evaluate: Callable[[int, int], None] | None,
    log: MetricsFile,
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
