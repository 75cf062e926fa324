"""Preference pairs for DPO: a JSONL file of {prompt, chosen, rejected}, validated and tokenized.

Every malformed row is a `DataError` naming `file:line`, raised before any actor starts. A pair
becomes two rows of the project's batch layout (`rayrlhf.types`): the prompt left-padded to P
columns, then the response right-padded to R columns. Chosen and rejected share P and R, so a
micro-batch runs both sides in one forward pass.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rayrlhf.data.prompts import DataError
from rayrlhf.types import pad_rows

KEYS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferenceBatch:
    """B preference pairs in the batch layout; both sides padded to the same P and R."""

    chosen_sequences: Tensor
    """[B, T] int64: left-padded prompt then right-padded chosen response (T = P + R)."""
    chosen_attention_mask: Tensor
    """[B, T] int64, 1 on real tokens."""
    chosen_action_mask: Tensor
    """[B, R] float32, 1 on real chosen-response tokens."""
    rejected_sequences: Tensor
    """[B, T] int64: the same prompt, then the rejected response."""
    rejected_attention_mask: Tensor
    """[B, T] int64."""
    rejected_action_mask: Tensor
    """[B, R] float32."""

    def __len__(self) -> int:
        return self.chosen_sequences.shape[0]

    def stacked(self) -> tuple[Tensor, Tensor, Tensor]:
        """Both sides as one [2B, T] batch (chosen rows first): sequences, attention, action."""
        return (
            torch.cat([self.chosen_sequences, self.rejected_sequences]),
            torch.cat([self.chosen_attention_mask, self.rejected_attention_mask]),
            torch.cat([self.chosen_action_mask, self.rejected_action_mask]),
        )


@dataclass(frozen=True)
class PreferenceSet:
    """Tokenized pairs of one file; `batch(indices)` lays any subset out as a PreferenceBatch."""

    prompts: tuple[str, ...]
    prompt_ids: tuple[tuple[int, ...], ...]
    chosen_ids: tuple[tuple[int, ...], ...]
    """Response tokens, EOS included (the policy learns to stop)."""
    rejected_ids: tuple[tuple[int, ...], ...]
    pad_id: int

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: list[int]) -> PreferenceBatch:
        """The pairs at `indices`, in that order."""
        prompts = pad_rows([list(self.prompt_ids[i]) for i in indices], self.pad_id, left=True)
        ones = pad_rows([[1] * len(self.prompt_ids[i]) for i in indices], 0, left=True)
        chosen = [list(self.chosen_ids[i]) for i in indices]
        rejected = [list(self.rejected_ids[i]) for i in indices]
        width = max(len(r) for r in chosen + rejected)
        sides = [_side(prompts, ones, rows, width, self.pad_id) for rows in (chosen, rejected)]
        return PreferenceBatch(*sides[0], *sides[1])

    def order(self, epoch: int, seed: int) -> list[int]:
        """A shuffled order of all pairs, a pure function of (seed, epoch)."""
        out = list(range(len(self)))
        random.Random(seed * 1_000_003 + epoch).shuffle(out)
        return out


def _side(
    prompts: Tensor, prompt_mask: Tensor, responses: list[list[int]], width: int, pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(sequences, attention_mask, action_mask) of one side, responses padded to `width`."""
    resp = pad_rows([r + [pad_id] * (width - len(r)) for r in responses], pad_id, left=False)
    mask = pad_rows([[1] * len(r) + [0] * (width - len(r)) for r in responses], 0, left=False)
    return torch.cat([prompts, resp], 1), torch.cat([prompt_mask, mask], 1), mask.float()


def read_preference_rows(path: Path) -> list[tuple[int, str, str, str]]:
    """(line, prompt, chosen, rejected) for every non-blank line; bad rows name file:line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8") from None
    rows = []
    # split on \n only: str.splitlines() also breaks at U+2028, which JSON allows in strings
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            rows.append((n, *check_preference_row(line, f"{path}:{n}")))
    if not rows:
        raise DataError(f"{path}: no preference pairs in the file")
    return rows


def check_preference_row(line: str, where: str) -> tuple[str, str, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with keys {', '.join(KEYS)}")
    for key in KEYS:
        if key not in row:
            raise DataError(f"{where}: missing key {key!r}")
        if not isinstance(row[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")
        if not row[key].strip():
            raise DataError(f"{where}: {key!r} is empty")
    if row["chosen"] == row["rejected"]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
    return row["prompt"], row["chosen"], row["rejected"]


def load_preferences(path: str | Path, tokenizer, max_len: int) -> PreferenceSet:
    """Read, validate and tokenize a preference file; prompt + response must fit `max_len`."""
    path = Path(path)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts, p_ids, c_ids, r_ids = [], [], [], []
    for line, prompt, chosen, rejected in read_preference_rows(path):
        p = tuple(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        sides = []
        for key, text in (("chosen", chosen), ("rejected", rejected)):
            ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
            if len(p) + len(ids) > max_len:
                raise DataError(
                    f"{path}:{line}: prompt + {key} is {len(p) + len(ids)} tokens, more than "
                    f"data.max_len={max_len}"
                )
            sides.append(ids)
        prompts.append(prompt)
        p_ids.append(p)
        c_ids.append(sides[0])
        r_ids.append(sides[1])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    return PreferenceSet(tuple(prompts), tuple(p_ids), tuple(c_ids), tuple(r_ids), pad)
