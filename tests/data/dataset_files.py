"""Test helpers: the same rows written in every format the loaders read, and tokenizers with and
without a chat template."""

from __future__ import annotations

import json
from pathlib import Path

FORMATS = ("jsonl", "parquet", "saved", "arrow")
"""JSONL, a parquet file, a `save_to_disk` directory, a bare arrow file."""

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""A small template in the style of real ones: BOS, role markers, a generation prompt."""


def write_rows(rows: list[dict], directory: Path, fmt: str, name: str = "rows") -> Path:
    """`rows` written as `fmt` under `directory`; returns the path a loader is given."""
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    import datasets

    datasets.disable_progress_bars()
    # from_list takes its columns from the first row: give it every row's (None where unset)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    ds = datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in columns})
    if fmt == "parquet":
        ds.to_parquet(str(directory / f"{name}.parquet"))
        return directory / f"{name}.parquet"
    ds.save_to_disk(str(directory / name))
    if fmt == "saved":
        return directory / name
    assert fmt == "arrow", fmt
    (arrow,) = (directory / name).glob("*.arrow")
    return arrow


def where(path: Path, fmt: str, n: int) -> str:
    """How an error names row `n` (0-based): the JSONL line (rows written one per line) or the
    row index."""
    return f"{path}:{n + 1}" if fmt == "jsonl" else f"{path} row {n}"


def plain(tokenizer):
    """`tokenizer` without a chat template: the untemplated rendering path."""
    tokenizer.chat_template = None
    return tokenizer


def templated(tokenizer):
    """`tokenizer` with `CHAT_TEMPLATE`."""
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
