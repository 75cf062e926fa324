"""Writing a model directory so that it is either complete or absent: a failed save (a full
disk, a killed process) never leaves a config.json without its weights, which `from_pretrained`
and the pre-flight checks would take for a model.

Everything is written into `<dir>.tmp`, fsynced, and renamed to `<dir>` once complete. A
previous `<dir>` is moved aside first and deleted only after the new one is in place; a stale
`<dir>.tmp` from an interrupted save is discarded at the next one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yields `<path>.tmp` to write into; on success it becomes `path`, replacing what was
    there; on an error it is removed and `path` is left as it was."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    fsync_path(path.parent)
    if old.exists():
        shutil.rmtree(old)


def fsync_tree(root: Path) -> None:
    """Every file under `root` and the directories themselves, on disk before the rename."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def fsync_path(path: Path) -> None:
    """fsync one file or directory (a directory's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
