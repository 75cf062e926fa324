"""The JSONL reader, which names `file:line` for every bad row and can skip bad rows instead,
and the row collector every reader shares (`rayrlhf.data.sources` adds parquet and arrow).

With `on_bad_row="error"` the first bad row raises `DataError`; with `"skip"` bad rows are left
out and their messages returned, so the driver can print how many were dropped and why. An empty
file, or one whose every row is bad, is always an error.

Lines are split on the byte b"\\n" before decoding: that byte never occurs inside a multi-byte
UTF-8 sequence, so invalid UTF-8 is reported on its own line and the other rows still load.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import TypeVar

from rayrlhf.config import OnBadRow

T = TypeVar("T")
__all__ = ["DataError", "OnBadRow", "collect_rows", "read_jsonl", "require_text"]


class DataError(ValueError):
    """A malformed dataset; the message names the file and line."""


def parse_line(raw: bytes, where: str, last_unterminated: bool) -> dict:
    """One line's JSON object; `DataError` for bad UTF-8, bad JSON or a non-object."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{where}: invalid UTF-8") from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        what = "truncated last line" if last_unterminated else "not valid JSON"
        raise DataError(f"{where}: {what} ({err.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def collect_rows(
    source: object,
    items: Iterable[tuple[int, str, Callable[[], dict]]],
    check: Callable[[dict, str], T],
    on_bad_row: OnBadRow,
    what: str,
) -> tuple[list[tuple[int, T]], list[str]]:
    """(n, check(parse(), where)) for each (n, where, parse) of `items`, and skip messages.

    `parse` and `check` raise `DataError` for a bad row; "error" re-raises it, "skip" records
    it. No good row at all is an error naming `source`. Every reader (JSONL, parquet, arrow)
    goes through here, so on_bad_row means the same for all of them.
    """
    rows, skipped = [], []
    for n, where, parse in items:
        try:
            rows.append((n, check(parse(), where)))
        except DataError as err:
            if on_bad_row == "error":
                raise
            skipped.append(str(err))
    if not rows:
        detail = f" ({len(skipped)} bad, first: {skipped[0]})" if skipped else ""
        raise DataError(f"{source}: no {what} in the file{detail}")
    return rows, skipped


def read_jsonl(
    path: str | Path,
    check: Callable[[dict, str], T],
    on_bad_row: OnBadRow = "error",
    what: str = "rows",
) -> tuple[list[tuple[int, T]], list[str]]:
    """(line number, check(row, "file:line")) for each good non-blank line, and skip messages.

    `check` raises `DataError` for a bad row; "error" re-raises it, "skip" records it.
    """
    return collect_rows(path, _lines(Path(path)), check, on_bad_row, what)


def _lines(path: Path) -> Iterator[tuple[int, str, Callable[[], dict]]]:
    """(line number, "file:line", parse) of every non-blank line."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    unterminated = not raw.endswith(b"\n")
    for n, line in enumerate(lines, 1):
        if line.strip():
            where = f"{path}:{n}"
            yield n, where, partial(parse_line, line, where, unterminated and n == len(lines))


def require_text(row: dict, key: str, where: str) -> str:
    """`row[key]` as a non-empty string, or a `DataError` naming the key."""
    if key not in row:
        raise DataError(f"{where}: missing key {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {key!r} is empty")
    return value
