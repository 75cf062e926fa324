"""A run's directory, as every recipe lays it out: config.yaml, metrics.jsonl, the demo models.

run_dir/config.yaml     the validated config, every default filled in
run_dir/metrics.jsonl   one JSON record per line (steps, evals), appended to (on resume too)
run_dir/events.out.tfevents.*   the same records for TensorBoard (metrics.tensorboard)

A directory holding a run (config.yaml or metrics.jsonl, in it or in a stage directory one level
down) is never silently reused: a fresh run into it is refused before Ray starts unless the
config says `overwrite: true` (its outputs are then deleted, after the pre-flight checks passed)
or `resume` (PPO: it continues). metrics.jsonl is written a whole line per write, so a full disk
can cut at most its last line, which `read_metrics` reports and skips.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

import yaml

from rayrlhf.config import ConfigError, MetricsConfig, Section
from rayrlhf.runtime.tensorboard import TensorBoardWriter

RUN_MARKERS = ("config.yaml", "metrics.jsonl")
"""Files that show a directory holds a run (written by every command)."""


def build_tiny_models(directory: str | None, size: str = "tiny") -> None:
    """Demo recipes: build the tiny models into `directory` unless they are already there.
    Each model directory is built whole beside its place and moved in, the policy (what this
    check reads) last, so an interrupted build is never taken for a finished one."""
    if directory and not (Path(directory) / "policy" / "config.json").exists():
        from rayrlhf.models.tiny import make_tiny

        target = Path(directory)
        built = target.with_name(target.name + ".tmp")
        shutil.rmtree(built, ignore_errors=True)  # an interrupted build's leftovers
        make_tiny(built, size=size)
        target.mkdir(parents=True, exist_ok=True)
        for role in sorted(built.iterdir(), key=lambda p: p.name == "policy"):
            if (target / role.name).exists():
                shutil.rmtree(target / role.name)
            role.rename(target / role.name)
        built.rmdir()


def previous_run(run_dir: str | Path) -> Path | None:
    """The file showing that `run_dir` holds a run, in it or one level down (the pipeline's
    stages); None for a new or empty directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    for where in (run_dir, *sorted(p for p in run_dir.iterdir() if p.is_dir())):
        for name in RUN_MARKERS:
            if (where / name).is_file():
                return where / name
    return None


def check_run_dir(cfg: Section) -> None:
    """A fresh run into a directory holding a run is a `ConfigError` (exit 2, before Ray starts)
    saying how to proceed, unless `cfg.overwrite` or `cfg.resume` (PPO) is set."""
    found = previous_run(cfg.run_dir)
    if found is None or cfg.overwrite or getattr(cfg, "resume", False):
        return
    resume = " or --resume to continue it," if "resume" in type(cfg).model_fields else ""
    raise ConfigError(
        f"invalid config:\n  run_dir: {cfg.run_dir} holds a previous run ({found}); a new run "
        f"would mix its files with that one's. Choose another run_dir,{resume} or "
        "--set overwrite=true to delete that run's outputs first"
    )


def note_used_run_dir(cfg: Section) -> None:
    """`rayrlhf check-config`: say on stderr, without failing, when a run would refuse
    run_dir (a config may well be checked after its run)."""
    try:
        check_run_dir(cfg)
    except ConfigError as err:
        print(f"note: {str(err).removeprefix('invalid config:').strip()}", file=sys.stderr)


def input_paths(cfg: Section, run_dir: Path, outputs: Iterable[str] = ()) -> list[Path]:
    """Configured paths (models, data) that lie inside `run_dir`, except under the entries
    named in `outputs` (what the command itself writes there, e.g. the pipeline's stages)."""
    run_dir = run_dir.resolve()
    skip = [run_dir / o for o in outputs]
    found = []

    def walk(node: object, key: str = "") -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and key != "run_dir" and node:
            path = Path(node).resolve()
            inside = path.is_relative_to(run_dir) and path != run_dir
            if inside and not any(path.is_relative_to(s) for s in skip):
                found.append(path)

    walk(cfg.model_dump(mode="json"))
    return found


def clear_run_dir(run_dir: str | Path, keep: Iterable[str | Path] = ()) -> list[str]:
    """Delete every entry of `run_dir` but those that are or hold a path of `keep` (inputs);
    returns the names deleted. Links are removed, never followed."""
    run_dir = Path(run_dir)
    kept = [Path(k).resolve() for k in keep]
    removed = []
    for entry in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        if any(k == entry.resolve() or k.is_relative_to(entry.resolve()) for k in kept):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed


def write_run_config(
    cfg: Section,
    run_dir: str | Path,
    keep: Iterable[str | Path] = (),
    outputs: Iterable[str] = (),
) -> Path:
    """Claim `run_dir` for this run and record the validated config there; returns run_dir.

    Called once the pre-flight checks have passed, before Ray starts: a directory holding a
    previous run is refused (`check_run_dir`), or with `overwrite` emptied of it first, keeping
    the configured inputs inside it (but under `outputs`, entries the command itself writes)
    and the paths of `keep` (e.g. synthetic data pre-flight just wrote); with `resume` it is
    kept as it is."""
    run_dir = Path(run_dir)
    check_run_dir(cfg)
    if cfg.overwrite and not getattr(cfg, "resume", False) and previous_run(run_dir):
        removed = clear_run_dir(run_dir, [*keep, *input_paths(cfg, run_dir, outputs)])
        print(f"overwrite: removed the previous run's {', '.join(removed)} from {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    (run_dir / "config.yaml").write_text(text)
    return run_dir


class MetricsWriter:
    """Appends one JSON record per line to run_dir/metrics.jsonl and, with `tensorboard`, writes
    its numbers to TensorBoard event files there too. Every command logs through here, so
    every command's metrics reach TensorBoard.

    A record is one `os.write` of its whole line to a file opened for appending: it reaches the
    OS at once (a run that dies keeps every record written), and a write cut short (a full
    disk) can only tear the last line. A torn last line left by an earlier process is cut off
    when the file is opened, so the next record starts on a line of its own."""

    def __init__(
        self, run_dir: str | Path, tensorboard: bool = MetricsConfig().tensorboard
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        _cut_torn_tail(self.path)
        self.tensorboard = TensorBoardWriter(run_dir) if tensorboard else None

    def write(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
        finally:
            os.close(fd)
        if written != len(line):  # only on a full disk or quota: the line is torn
            raise OSError(f"{self.path}: wrote {written} of {len(line)} bytes of a record")
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        """Close the event files (each record is already flushed: closing is tidiness)."""
        if self.tensorboard is not None:
            self.tensorboard.close()


class TornMetricsWarning(UserWarning):
    """metrics.jsonl ends in an incomplete line (a write cut short, e.g. by a full disk)."""


def _cut_torn_tail(path: Path) -> None:
    """Truncate `path` after its last newline if its last line is unterminated (torn)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        os.truncate(path, keep)
        warnings.warn(
            f"{path}: removed an incomplete last line ({len(data) - keep} bytes)",
            TornMetricsWarning,
            stacklevel=3,
        )


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl, in order. An incomplete last line (a write cut
    short) is left out with a `TornMetricsWarning`; a bad line elsewhere is a ValueError naming
    file:line."""
    path = Path(run_dir) / "metrics.jsonl"
    data = path.read_bytes()
    lines = data.split(b"\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n == len(lines):  # no newline after it: the last write was cut short
                warnings.warn(
                    f"{path}:{n}: incomplete last line left out ({len(line)} bytes)",
                    TornMetricsWarning,
                    stacklevel=2,
                )
                break
            raise ValueError(f"{path}:{n}: not a JSON record ({err.msg})") from None
    return records
