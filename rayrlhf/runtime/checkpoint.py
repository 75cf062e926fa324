"""Checkpoints of a PPO run: atomic, verified, rotated, and checked against the resuming config.

    run_dir/checkpoints/step_N/       N = steps completed (step N/total of the progress line)
        policy/ds/...                 each policy rank's DeepSpeed ZeRO-3 state: weight
        critic/ds/...                 partitions, AdamW moments, LR schedule, RNG (the ranks write)
        driver.json                   step, KL controller, reward moments, prompt ledger, RNG
        driver_rng.safetensors        the driver's torch RNG state
        metrics.jsonl, ledger.jsonl   the run's records up to step N
        manifest.json                 written last: sha256 and size of every other file, world
                                      sizes, step, the config a resume must match, dataset

A checkpoint is written into `step_N.tmp/`, every file fsynced, the manifest last, then renamed
to `step_N/`: a directory is complete exactly when its manifest verifies, and any other is never
loaded. Rotation keeps `keep_last` complete checkpoints and deletes only older ones, so the newest
complete checkpoint always survives. Everything unpickled goes through `safe_torch_load`
(weights_only=True); a pickle that would import code is refused before any rank reads it.

run_dir must be on a filesystem that the driver and every rank see (one node, or shared storage).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rayrlhf.config import ConfigError, TrainConfig
from rayrlhf.models.saving import fsync_path, fsync_tree
from rayrlhf.workers.deepspeed_role import UnsafePickleError, safe_torch_load

FORMAT = 1
"""Version of the layout above; another version is refused."""
MANIFEST = "manifest.json"
MAY_CHANGE = (
    "steps", "resume", "checkpoint", "run_dir", "ray_address", "phase_timeout_s",
    "placement_timeout_s", "save_final", "make_tiny_models", "metrics", "eval", "sync",
    "overwrite", "fault",
)  # fmt: skip
"""Top-level fields a resume may change: how long, where and how watched, never what is
trained. Every `resources` section may change too (placement, not maths)."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from; the message says what is wrong or differs."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (e.g. a full disk): its partial directory is
    removed, every older checkpoint is untouched; the message names the one kept."""


def resume_fields(cfg: TrainConfig) -> dict[str, object]:
    """The dotted config fields a resume must match, with their values."""
    out: dict[str, object] = {}

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key != "resources" and not (not path and key in MAY_CHANGE):
                    walk(value, f"{path}.{key}" if path else key)
        else:
            out[path] = node

    walk(cfg.model_dump(mode="json"), "")
    return out


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def dataset_fingerprint(texts: list[str], ids: list[list[int]], columns: list[dict]) -> str:
    """sha256 of the prompt set as trained on: every prompt's text, token ids and columns."""
    h = hashlib.sha256()
    for text, row_ids, cols in zip(texts, ids, columns):
        h.update(json.dumps([text, row_ids, cols], sort_keys=True, default=str).encode())
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(tmp: Path, info: dict) -> None:
    """fsync every file under `tmp`, then write its manifest (`info` plus each file's sha256
    and size), fsynced, last."""
    fsync_tree(tmp)
    files = {
        str(path.relative_to(tmp)): {"sha256": sha256_file(path), "size": path.stat().st_size}
        for path in _files(tmp)
    }
    body = {"format": FORMAT, **info, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(body, indent=1))
    fsync_path(tmp / MANIFEST)
    fsync_path(tmp)


def commit(tmp: Path) -> Path:
    """Rename a manifested `step_N.tmp` to `step_N` (replacing an incomplete one); durable."""
    final = tmp.with_suffix("")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_path(final.parent)
    return final


def read_manifest(path: Path) -> dict | None:
    """The manifest of checkpoint `path` if it parses and every file it lists is there with its
    size (a quick check; `verify` hashes), else None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if manifest["format"] != FORMAT or not files:
            return None
        ok = all((path / f).stat().st_size == meta["size"] for f, meta in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if ok else None


def verify(path: Path) -> dict:
    """The manifest of `path` after checking every file's sha256, that no file is unlisted, and
    that every pickle is safe; CheckpointError naming the first problem otherwise."""
    manifest = read_manifest(path)
    if manifest is None:
        raise CheckpointError(f"{path}: no valid {MANIFEST} (an incomplete checkpoint)")
    listed = manifest["files"]
    for rel, meta in listed.items():
        if sha256_file(path / rel) != meta["sha256"]:
            raise CheckpointError(f"{path / rel}: contents differ from the manifest (corrupt)")
    extra = [
        str(p.relative_to(path)) for p in _files(path) if str(p.relative_to(path)) not in listed
    ]
    if extra:
        raise CheckpointError(f"{path}: files not in the manifest: {', '.join(extra[:3])}")
    for rel in listed:
        if rel.endswith(".pt"):
            try:
                safe_torch_load(str(path / rel), map_location="cpu", mmap=True)
            except UnsafePickleError as err:
                raise CheckpointError(str(err)) from None
    return manifest


def step_of(path: Path) -> int | None:
    """N of a `step_N` directory name; None for anything else (`step_N.tmp` included)."""
    head, _, n = path.name.partition("_")
    return int(n) if head == "step" and n.isdigit() else None


def complete(run_dir: Path) -> list[Path]:
    """The checkpoints of `run_dir` whose manifest passes the quick check, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if step_of(p) is not None] if root.is_dir() else []
    return sorted((p for p in found if read_manifest(p)), key=step_of)


def newest_complete(run_dir: Path) -> Path | None:
    """The newest checkpoint that fully verifies; a newer broken one is skipped with a warning
    (it is never loaded)."""
    for path in reversed(complete(run_dir)):
        try:
            verify(path)
            return path
        except CheckpointError as err:
            print(f"rayrlhf: skipping checkpoint {path.name}: {err}", flush=True)
    return None


def rotate(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last` complete ones, and
    leftover `.tmp` directories of interrupted writes; returns what was deleted. Incomplete
    directories never count as kept, so the newest complete checkpoint always survives."""
    done = complete(run_dir)
    doomed = done[: max(len(done) - max(keep_last, 1), 0)]
    doomed += list((Path(run_dir) / "checkpoints").glob("step_*.tmp"))
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def check_compatible(manifest: dict, cfg: TrainConfig, dataset: str) -> None:
    """Refuse a resume whose config, rank counts or prompt set differ from the checkpoint's,
    saying what differs; nothing is loaded before this passes."""
    where = f"checkpoint step_{manifest['step']}"
    want = {"policy": cfg.policy.num_ranks}
    if cfg.active_critic:
        want["critic"] = cfg.active_critic.num_ranks
    if manifest["world_sizes"] != want:
        raise CheckpointError(
            f"{where} was written by ranks {manifest['world_sizes']}, this config has {want}: "
            "ZeRO-3 partitions of weights and optimizer states cannot be re-split; resume with "
            "the same num_ranks"
        )
    if manifest["dataset"] != dataset:
        raise CheckpointError(
            f"{where}: the prompt set changed (data.* or the prompt file's contents): resuming "
            "would train on other prompts than the ledger records; restore the data or start a "
            "new run_dir"
        )
    old, new = manifest["config"], resume_fields(cfg)
    diff = [
        f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]
    if diff:
        raise CheckpointError(
            f"{where} was trained with another config; changed: " + "; ".join(diff[:8])
            + f" (only {', '.join(MAY_CHANGE)} and resources may change on resume)"
        )  # fmt: skip


# ---- the driver's own state ----------------------------------------------------------------


def save_driver_state(path: Path, state: dict) -> None:
    """driver.json (`state` + Python and NumPy RNG) and driver_rng.safetensors (torch RNG)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        **state,
        "python_rng": random.getstate(),
        "numpy_rng": [kind, keys.tolist(), pos, has_gauss, gauss],
    }
    (path / "driver.json").write_text(json.dumps(state))
    save_file({"torch": torch.get_rng_state()}, path / "driver_rng.safetensors")


def load_driver_state(path: Path) -> dict:
    """What `save_driver_state` wrote; the driver's RNGs are restored as a side effect."""
    state = json.loads((path / "driver.json").read_text())
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state.pop("numpy_rng")
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(load_file(path / "driver_rng.safetensors")["torch"])
    return state


RECORDS = ("metrics.jsonl", "ledger.jsonl")
"""run_dir files a checkpoint holds up to its step and a resume puts back (then appends to)."""


def world_sizes(cfg: TrainConfig) -> dict[str, int]:
    """Ranks of each ZeRO-3 group of `cfg`: the partitioning a checkpoint is bound to."""
    out = {"policy": cfg.policy.num_ranks}
    if cfg.active_critic:
        out["critic"] = cfg.active_critic.num_ranks
    return out


class Checkpoints:
    """The checkpoints of one run: when one is due, writing it, and resuming from one.

    `roles` is the run's `Roles`: `save_checkpoint(dir)` has every ZeRO-3 rank write its state
    under dir/<role>/, `load_checkpoint(dir)` loads it and syncs the engines."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, dataset: str) -> None:
        self.cfg, self.dir, self.dataset = cfg, Path(run_dir), dataset
        self.root = self.dir / "checkpoints"

    def resume_point(self) -> Path | None:
        """The newest complete checkpoint, checked against this run's config and data (a
        CheckpointError says what differs); None when there is none."""
        path = newest_complete(self.dir)
        if path is not None:
            check_compatible(read_manifest(path), self.cfg, self.dataset)
        return path

    def due(self, steps_done: int) -> bool:
        every = self.cfg.checkpoint.every_steps
        return every > 0 and steps_done % every == 0

    def save(self, steps_done: int, roles, state: dict) -> Path:
        """Write checkpoint step_<steps_done> atomically, then rotate; returns its path. A write
        that fails (CheckpointWriteError) leaves the checkpoints as they were."""
        tmp = self.root / f"step_{steps_done}.tmp"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            roles.save_checkpoint(str(tmp))
            save_driver_state(tmp, {**state, "step": steps_done})
            for name in RECORDS:
                if (self.dir / name).exists():
                    shutil.copyfile(self.dir / name, tmp / name)
            fields = resume_fields(self.cfg)
            info = {"step": steps_done, "world_sizes": world_sizes(self.cfg), "config": fields}
            write_manifest(tmp, {**info, "config_hash": _digest(fields), "dataset": self.dataset})
        except OSError as err:  # the kernel's message names no file: say which, and what is kept
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk needs the space back
            done = complete(self.dir)
            kept = f"{done[-1]} is kept" if done else "there is no earlier one"
            raise CheckpointWriteError(
                f"checkpoint {tmp.with_suffix('')} not written: {err}; {kept}"
            ) from err
        final = commit(tmp)
        rotate(self.dir, self.cfg.checkpoint.keep_last)
        return final

    def restore(self, path: Path, roles) -> dict:
        """Load checkpoint `path` into the ranks and the engines, put its records back into
        run_dir (dropping any written after it) and return the driver's state."""
        roles.load_checkpoint(str(path), read_manifest(path)["step"])
        self.reset_records(path)
        return load_driver_state(path)

    def reset_records(self, path: Path | None) -> None:
        """Put checkpoint `path`'s records back into run_dir; with None (a resume that found no
        checkpoint, so starts at step 1) drop them."""
        for name in RECORDS:
            (self.dir / name).unlink(missing_ok=True)
            if path is not None and (path / name).exists():
                shutil.copyfile(path / name, self.dir / name)
