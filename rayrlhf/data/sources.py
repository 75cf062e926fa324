"""Rows from the dataset a user brings: JSONL, parquet, an arrow file, or a directory written by
`datasets.save_to_disk`, all checked by the same row functions and `on_bad_row` setting.

    *.parquet            `datasets.Dataset.from_parquet`     rows named "file row i"
    *.arrow              `datasets.Dataset.from_file`        rows named "file row i"
    a directory          `datasets.load_from_disk`           rows named "dir row i"
    anything else        JSONL (`rayrlhf.data.jsonl`)        rows named "file:line"

i is the 0-based row index, as in `dataset[i]`. JSONL keeps the project's byte-level reader
rather than `datasets`' JSON loader: that loader infers one schema for the whole file, so one
malformed line fails the file without naming the line, a row cannot be skipped, and a field that
is text in one row and a number in another is an error or silently recast. The byte-level reader
names the exact line and judges each row on its own.

Parquet and arrow hold one schema for all rows: a column absent from a row reads as None there.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from rayrlhf.data.jsonl import DataError, OnBadRow, collect_rows, read_jsonl

if TYPE_CHECKING:
    from datasets import Dataset

T = TypeVar("T")
SourceKind = Literal["jsonl", "parquet", "arrow", "saved"]


def source_kind(path: str | Path) -> SourceKind:
    """How `path` is read: by its suffix, or 'saved' for a `save_to_disk` directory."""
    path = Path(path)
    if path.is_dir():
        return "saved"
    return {".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix.lower(), "jsonl")


SAVED_MARKERS = ("state.json", "dataset_dict.json")
"""What `save_to_disk` writes into a Dataset's (a DatasetDict's) directory."""


def check_source(path: str | Path) -> None:
    """`path` exists and is a file, or a directory written by `datasets.save_to_disk`: else a
    `DataError` saying what it is (never a raw IsADirectoryError from deep in a reader)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        if not any((path / m).is_file() for m in SAVED_MARKERS):
            raise DataError(
                f"{path}: is a directory, not a data file nor one written by "
                "datasets.save_to_disk (no state.json or dataset_dict.json in it); give a JSONL, "
                "parquet or arrow file, or such a directory"
            )
    elif not path.is_file():
        raise DataError(f"{path}: not a regular file")


def read_rows(
    path: str | Path,
    check: Callable[[dict, str], T],
    on_bad_row: OnBadRow = "error",
    what: str = "rows",
) -> tuple[list[tuple[int, T]], list[str]]:
    """(line or row index, check(row, where)) for each good row of any supported source, and
    the skip messages. `where` is "file:line" (JSONL) or "file row i" (parquet, arrow)."""
    path = Path(path)
    check_source(path)
    kind = source_kind(path)
    if kind == "jsonl":
        return read_jsonl(path, check, on_bad_row, what)
    return collect_rows(
        path, _dataset_rows(path, open_dataset(path, kind)), check, on_bad_row, what
    )


def _dataset_rows(path: Path, dataset: Dataset) -> Iterator[tuple[int, str, Callable[[], dict]]]:
    for i, row in enumerate(dataset):
        yield i, f"{path} row {i}", lambda row=row: row


def open_dataset(path: Path, kind: SourceKind) -> Dataset:
    """The `datasets.Dataset` at `path`; an unreadable one is a `DataError` naming it."""
    import datasets

    datasets.disable_progress_bars()  # one bar per file read would bury the run's own log
    try:
        if kind == "parquet":
            # from_parquet copies the file into an arrow cache: keep it in memory and drop the
            # copy, so reading a prompt file leaves nothing under ~/.cache.
            with tempfile.TemporaryDirectory() as cache:
                return datasets.Dataset.from_parquet(
                    str(path), cache_dir=cache, keep_in_memory=True
                )
        if kind == "arrow":
            return datasets.Dataset.from_file(str(path))
        loaded = datasets.load_from_disk(str(path))
    # pyarrow's ArrowInvalid is a ValueError; datasets 5.2 raises IndexError loading a
    # directory saved from an empty dataset.
    except (OSError, ValueError, IndexError) as err:
        what = {"parquet": "a parquet file", "arrow": "an arrow file"}.get(kind, "a dataset")
        hint = " (is it empty?)" if isinstance(err, IndexError) else ""
        raise DataError(f"{path}: cannot be read as {what}: {err}{hint}") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = ", ".join(loaded)
        raise DataError(
            f"{path}: holds a DatasetDict (splits: {splits}); point at one split's directory, "
            f"e.g. {path / next(iter(loaded))}"
        )
    return loaded
