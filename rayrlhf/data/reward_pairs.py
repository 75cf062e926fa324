"""Reward-model training pairs: rows {prompt, chosen, rejected[, margin]} from JSONL, parquet or a
`save_to_disk` directory, validated, tokenized.

The row checks are the DPO loader's (`rayrlhf.data.preferences`), so both commands report a bad
row the same way; on top of them come an optional numeric `margin` (Llama 2's margin term of the
Bradley-Terry loss) and `on_bad_row="skip"`, which drops bad rows and counts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rayrlhf.data.jsonl import DataError, OnBadRow
from rayrlhf.data.preferences import (
    PreferenceBatch,
    PreferenceSet,
    check_preference_row,
    tokenize_pair,
)
from rayrlhf.data.sources import read_rows
from rayrlhf.models.tokenizer import pad_id


@dataclass(frozen=True)
class RewardBatch:
    """B pairs in the batch layout (see `PreferenceBatch`), plus a margin and a weight per pair."""

    chosen_sequences: Tensor
    """[B, T] int64: left-padded prompt then right-padded chosen response."""
    chosen_attention_mask: Tensor
    """[B, T] int64, 1 on real tokens."""
    rejected_sequences: Tensor
    """[B, T] int64: the same prompt, then the rejected response."""
    rejected_attention_mask: Tensor
    """[B, T] int64."""
    margin: Tensor
    """[B] float32: required score gap r_chosen - r_rejected (0 without a margin column)."""
    weight: Tensor
    """[B] float32: 1 for real pairs, 0 for repeats that only pad a batch to equal shards."""

    def __len__(self) -> int:
        return self.chosen_sequences.shape[0]

    def stacked(self) -> tuple[Tensor, Tensor]:
        """Both sides as one [2B, T] batch, chosen rows first: (sequences, attention_mask)."""
        return (
            torch.cat([self.chosen_sequences, self.rejected_sequences]),
            torch.cat([self.chosen_attention_mask, self.rejected_attention_mask]),
        )


@dataclass(frozen=True)
class RewardPairSet:
    """Tokenized pairs of one file and their margins; `skipped` counts rows left out."""

    pairs: PreferenceSet
    margins: tuple[float, ...]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, indices: list[int], real: int | None = None) -> RewardBatch:
        """The pairs at `indices`; only the first `real` (default: all) get weight 1."""
        b: PreferenceBatch = self.pairs.batch(indices)
        real = len(indices) if real is None else real
        weight = torch.tensor([1.0 if i < real else 0.0 for i in range(len(indices))])
        margin = torch.tensor([self.margins[i] for i in indices], dtype=torch.float32)
        return RewardBatch(
            b.chosen_sequences, b.chosen_attention_mask,
            b.rejected_sequences, b.rejected_attention_mask, margin, weight,
        )  # fmt: skip


def check_reward_row(row: dict, where: str) -> tuple[str, str, str, float]:
    """(prompt, chosen, rejected, margin); the margin must be a finite number if present."""
    prompt, chosen, rejected = check_preference_row(row, where)
    margin = row.get("margin")
    if margin is None:  # absent, or null where a parquet/arrow column has no value for the row
        margin = 0.0
    if isinstance(margin, bool) or not isinstance(margin, int | float):
        raise DataError(f"{where}: 'margin' must be a number, got {type(margin).__name__}")
    if not math.isfinite(margin):
        raise DataError(f"{where}: 'margin' must be finite, got {margin}")
    return prompt, chosen, rejected, float(margin)


def load_reward_pairs(
    path: str | Path, tokenizer, max_len: int, on_bad_row: OnBadRow = "error"
) -> RewardPairSet:
    """Read, validate and tokenize; a pair whose prompt + response exceeds `max_len` is bad."""

    def tokenize(row: dict, where: str) -> tuple:
        prompt, chosen, rejected, margin = check_reward_row(row, where)
        ids = tokenize_pair(tokenizer, (prompt, chosen, rejected), max_len, where)
        return prompt, *ids, margin

    rows, skipped = read_rows(path, tokenize, on_bad_row, "preference pairs")
    cols = list(zip(*(r for _, r in rows)))
    pairs = PreferenceSet(*(tuple(c) for c in cols[:4]), pad_id(tokenizer))
    return RewardPairSet(pairs, tuple(cols[4]), len(skipped))
