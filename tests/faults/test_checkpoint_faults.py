"""Fault matrix, checkpoint files: a missing manifest, a corrupt shard, a malicious pickle and a
full disk. None of them is ever loaded; the previous checkpoint stays the resume point.

The ranks' part is the stand-in of tests/runtime/test_checkpoint.py (one torch file per group
where the DeepSpeed ranks write theirs). The full disk is real: a child process whose file-size
limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the kernel fail its writes with EFBIG.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import signal
import sys
import warnings
from pathlib import Path

import pytest
import torch

from rayrlhf.runtime.checkpoint import (
    MANIFEST,
    CheckpointError,
    Checkpoints,
    complete,
    newest_complete,
    read_manifest,
    verify,
    write_manifest,
)
from rayrlhf.runtime.run_dir import MetricsWriter, TornMetricsWarning, read_metrics

sys.path.insert(0, str(Path(__file__).parents[1] / "runtime"))  # its helpers, shared
from test_checkpoint import FakeRanks, config, save  # noqa: E402


def test_directory_without_manifest_is_never_loaded(tmp_path):
    good = save(tmp_path, 2)
    newer = save(tmp_path, 4)
    (newer / MANIFEST).unlink()  # as if killed between the files and the manifest
    (tmp_path / "checkpoints" / "step_6.tmp").mkdir()  # an interrupted write
    assert read_manifest(newer) is None
    assert complete(tmp_path) == [good]
    assert newest_complete(tmp_path) == good
    with pytest.raises(CheckpointError, match="no valid manifest"):
        verify(newer)


def test_tampered_file_is_refused_and_the_older_checkpoint_used(tmp_path, capsys):
    good = save(tmp_path, 2)
    bad = save(tmp_path, 4)
    shard = bad / "policy" / "ds" / "state.pt"
    original = shard.read_bytes()
    data = bytearray(original)
    data[-30] ^= 0xFF  # same size: only the hash can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"policy/ds/state.pt: contents differ"):
        verify(bad)
    assert newest_complete(tmp_path) == good
    assert "skipping checkpoint step_4" in capsys.readouterr().out
    shard.write_bytes(original)
    verify(bad)
    (bad / "policy" / "extra.pt").write_bytes(b"x")  # an unlisted file is refused too
    with pytest.raises(CheckpointError, match="not in the manifest"):
        verify(bad)


class Payload:
    """A pickle that runs a command when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    path = save(tmp_path, 2)
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "evil": Payload(marker)}, path / "policy" / "ds" / "state.pt")
    # An attacker can rewrite the manifest too: the hashes then match, the pickle check must hold.
    manifest = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).unlink()
    info = {k: v for k, v in manifest.items() if k not in ("files", "format")}
    write_manifest(path, info)
    with pytest.raises(CheckpointError, match="refusing to unpickle it .*GLOBAL posix.system"):
        verify(path)
    assert not marker.exists()
    assert newest_complete(tmp_path) is None


# ---- a full disk ---------------------------------------------------------------------------


def _with_file_size_limit(limit: int, fn, *args) -> str:
    """Run fn(*args) in a forked child whose every file may grow to `limit` bytes at most;
    returns what it raised ("" if nothing), as 'Type: message'."""
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)

    def child() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        try:
            fn(*args)
            writer.send("")
        except Exception as err:
            writer.send(f"{type(err).__name__}: {err}")

    proc = ctx.Process(target=child)
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0, f"child exited {proc.exitcode}"
    return reader.recv()


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n')
    good = save(tmp_path, 2)
    # 8 KiB: the ranks' files fit, the driver's state (its RNGs) does not.
    error = _with_file_size_limit(8192, save, tmp_path, 4)
    assert error.startswith("CheckpointWriteError: ") and "step_4" in error, error
    assert "File too large" in error and "step_2 is kept" in error, error
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2"]
    ckpt = Checkpoints(config(tmp_path), tmp_path, "data-1")
    assert ckpt.resume_point() == good
    ranks = FakeRanks()
    assert ckpt.restore(good, ranks)["step"] == 2 and ranks.loaded == [(str(good), 2)]


def _write_records(run_dir: Path, first: int, n: int) -> None:
    out = MetricsWriter(run_dir, tensorboard=False)
    for step in range(first, first + n):
        out.write({"step": step, "loss/policy": 0.125, "padding": "x" * 40})


def test_disk_full_never_leaves_metrics_the_reader_fails_on(tmp_path):
    error = _with_file_size_limit(1000, _write_records, tmp_path, 0, 100)
    assert error.startswith("OSError: ") and "metrics.jsonl" in error, error
    assert (tmp_path / "metrics.jsonl").stat().st_size == 1000  # up to the limit, then cut
    with pytest.warns(TornMetricsWarning):
        records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(len(records))) and len(records) > 5
    # The run resumes with space again: the torn line is cut, every record reads back whole.
    with pytest.warns(TornMetricsWarning, match="removed an incomplete last line"):
        _write_records(tmp_path, len(records), 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = read_metrics(tmp_path)
    assert [r["step"] for r in again] == list(range(len(records) + 3))
