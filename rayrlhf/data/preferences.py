"""Preference pairs for DPO: rows of {prompt, chosen, rejected}, validated and tokenized, from
JSONL, parquet or a `save_to_disk` directory (`rayrlhf.data.sources`).

Every malformed row is a `DataError` naming `file:line` (or `file row i`), raised before any
actor starts. The prompt is rendered as PPO's are (`rayrlhf.data.chat`, 'auto'). A pair
becomes two rows of the project's batch layout (`rayrlhf.types`): the prompt left-padded to P
columns, then the response right-padded to R columns. Chosen and rejected share P and R, so a
micro-batch runs both sides in one forward pass.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rayrlhf.data.chat import render_prompt, use_template
from rayrlhf.data.jsonl import DataError, OnBadRow, require_text
from rayrlhf.data.sources import read_rows
from rayrlhf.models.tokenizer import pad_id
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
    skipped: int = 0
    """Bad rows left out of the file (on_bad_row="skip")."""

    def __len__(self) -> int:
        return len(self.prompts)

    def response_tokens(self) -> tuple[Tensor, Tensor]:
        """([N], [N]) float32: the token counts of every chosen and rejected response."""
        return tuple(
            torch.tensor([len(ids) for ids in side], dtype=torch.float32)
            for side in (self.chosen_ids, self.rejected_ids)
        )

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


def check_preference_row(row: dict, where: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of one JSONL row: three non-empty strings, two different."""
    prompt, chosen, rejected = (require_text(row, key, where) for key in KEYS)
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
    return prompt, chosen, rejected


def tokenize_prompt(tokenizer, text: str) -> tuple[int, ...]:
    """The ids of a prompt, by `rayrlhf.data.chat`'s rule ('auto'): through the chat template
    if the tokenizer has one, as PPO's prompts are, else raw with its special tokens (BOS)."""
    templated = use_template(tokenizer, "auto")
    return tuple(render_prompt(tokenizer, text, templated, "prompt")[1])


def tokenize_response(
    tokenizer, prompt: tuple[int, ...], key: str, text: str, max_len: int, where: str
) -> tuple[int, ...]:
    """The ids of response `text` (row key `key`), ending with EOS; with the `prompt` ids they
    must fit `max_len`."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
    if len(prompt) + len(ids) > max_len:
        raise DataError(
            f"{where}: prompt + {key} is {len(prompt) + len(ids)} tokens, more than "
            f"data.max_len={max_len}"
        )
    return ids


def tokenize_pair(tokenizer, row: tuple[str, str, str], max_len: int, where: str) -> tuple:
    """(prompt ids, chosen ids, rejected ids) of a checked row; each response ends with EOS and
    prompt + response must fit `max_len`."""
    prompt, chosen, rejected = row
    p = tokenize_prompt(tokenizer, prompt)
    sides = [
        tokenize_response(tokenizer, p, key, text, max_len, where)
        for key, text in (("chosen", chosen), ("rejected", rejected))
    ]
    return p, sides[0], sides[1]


def load_preferences(
    path: str | Path, tokenizer, max_len: int, on_bad_row: OnBadRow = "error"
) -> PreferenceSet:
    """Read, validate and tokenize a preference file; prompt + response must fit `max_len`."""

    def check(row: dict, where: str) -> tuple:
        text = check_preference_row(row, where)
        return (text[0], *tokenize_pair(tokenizer, text, max_len, where))

    rows, skipped = read_rows(path, check, on_bad_row, "preference pairs")
    cols = list(zip(*(r for _, r in rows)))
    return PreferenceSet(*(tuple(c) for c in cols), pad_id(tokenizer), len(skipped))
