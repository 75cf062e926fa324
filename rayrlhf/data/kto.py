"""KTO data: rows of {prompt, completion, label}, validated and tokenized like the pairs, from
JSONL, parquet or a `save_to_disk` directory (`rayrlhf.data.sources`).

`label` is a boolean: true for a desirable completion, false for an undesirable one. A malformed
row is a `DataError` naming `file:line` (or `file row i`), raised before any actor starts, or,
with on_bad_row="skip", left out and counted.

KTO's reference point is a KL estimate on mismatched rows: one row's prompt with another row's
completion (Ethayarajh et al. 2024, Sec. 4.1). The pairing is fixed once per file, along a
seeded random cycle of the rows (a row with the same prompt is passed over), as TRL fixes its
KL dataset once; so the frozen reference scores the mismatched rows once, like the pairs. The
rows are laid out as a `PreferenceSet` whose first side is each row's completion and whose
second is its mismatched completion: the pair machinery (both sides in one forward pass, the
reference's cache, sharding) serves KTO unchanged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from rayrlhf.data.jsonl import DataError, OnBadRow, require_text
from rayrlhf.data.preferences import PreferenceSet, tokenize_prompt, tokenize_response
from rayrlhf.data.sources import read_rows
from rayrlhf.models.tokenizer import pad_id

KTO_KEYS = ("prompt", "completion", "label")


@dataclass(frozen=True)
class KTOSet:
    """Tokenized KTO rows of one file, in the pair layout, with their labels."""

    sides: PreferenceSet
    """chosen_ids: each row's completion (EOS included); rejected_ids: its mismatched
    completion, cut to fit data.max_len after this row's prompt."""
    desirable: tuple[bool, ...]
    """Each row's label."""

    def __len__(self) -> int:
        return len(self.desirable)


def check_kto_row(row: dict, where: str) -> tuple[str, str, bool]:
    """(prompt, completion, label) of one JSONL row: two non-empty strings and a boolean."""
    prompt, completion = (require_text(row, key, where) for key in KTO_KEYS[:2])
    if "label" not in row:
        raise DataError(f"{where}: missing key 'label'")
    label = row["label"]
    if not isinstance(label, bool):  # 1 / "true" would hide a mislabelled column
        raise DataError(f"{where}: 'label' must be true or false, got {type(label).__name__}")
    return prompt, completion, label


def mismatched_rows(prompts: list[str], seed: int = 0) -> list[int]:
    """For each row, another row whose completion it borrows for the KL estimate: the next row
    along a seeded random cycle whose prompt differs (the next row, if every prompt is equal)."""
    n = len(prompts)
    cycle = list(range(n))
    random.Random(seed).shuffle(cycle)
    position = {row: k for k, row in enumerate(cycle)}
    out = []
    for i in range(n):
        k = position[i]
        steps = (s for s in range(1, n) if prompts[cycle[(k + s) % n]] != prompts[i])
        out.append(cycle[(k + next(steps, 1)) % n])
    return out


def load_kto(path: str | Path, tokenizer, max_len: int, on_bad_row: OnBadRow = "error") -> KTOSet:
    """Read, validate and tokenize a KTO file; prompt + completion must fit `max_len`."""

    def check(row: dict, where: str) -> tuple:
        prompt, completion, label = check_kto_row(row, where)
        ids = tokenize_prompt(tokenizer, prompt)
        response = tokenize_response(tokenizer, ids, "completion", completion, max_len, where)
        return prompt, ids, response, label

    rows, skipped = read_rows(path, check, on_bad_row, "KTO rows")
    prompts, prompt_ids, completions, labels = (tuple(c) for c in zip(*(r for _, r in rows)))
    # The mismatched completion is only a KL sample: cutting it to fit is harmless.
    kl_side = tuple(
        completions[j][: max_len - len(p)]
        for p, j in zip(prompt_ids, mismatched_rows(list(prompts)))
    )
    sides = PreferenceSet(
        prompts, prompt_ids, completions, kl_side, pad_id(tokenizer), len(skipped)
    )
    return KTOSet(sides, labels)
