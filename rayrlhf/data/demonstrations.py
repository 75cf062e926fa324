"""SFT demonstrations: rows of {prompt, response} or chat {messages: [...]}, validated, tokenized,
from JSONL, parquet or a `save_to_disk` directory (`rayrlhf.data.sources`).

Rendering. The prompt follows `rayrlhf.data.chat`'s rule: with the chat template on, the
messages before the last one are rendered with `apply_chat_template(...,
add_generation_prompt=True)`, and the last (assistant) message is the response; a {prompt,
response} row is the chat [user: prompt, assistant: response]. With it off the prompt is the
plain text (chat: the earlier messages' contents joined by newlines) and the response is " " +
response, so the tokens are those of `prompt + " " + response`, the way the policy continues a
prompt. The response ends with EOS so the policy learns to stop; the loss covers response tokens
only.

Bad rows name `file:line` (JSONL) or `file row i` (parquet, arrow): missing key, wrong type,
empty prompt/response, invalid UTF-8, a truncated last line, an empty file, prompt + response
longer than `max_len`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rayrlhf.config import ChatTemplateMode
from rayrlhf.data.chat import check_messages, render_prompt, use_template
from rayrlhf.data.jsonl import DataError, OnBadRow, require_text
from rayrlhf.data.sources import read_rows
from rayrlhf.types import pad_rows


@dataclass(frozen=True)
class SFTBatch:
    """B demonstrations in the batch layout of `rayrlhf.types` (prompt left, response right)."""

    sequences: Tensor
    """[B, T] int64: left-padded prompt then right-padded response (T = P + R)."""
    attention_mask: Tensor
    """[B, T] int64, 1 on real tokens."""
    action_mask: Tensor
    """[B, R] float32, 1 on real response tokens: the tokens the loss covers."""

    def __len__(self) -> int:
        return self.sequences.shape[0]


@dataclass(frozen=True)
class SFTSet:
    """Tokenized demonstrations of one file; `skipped` counts rows left out (on_bad_row=skip)."""

    prompts: tuple[str, ...]
    prompt_ids: tuple[tuple[int, ...], ...]
    response_ids: tuple[tuple[int, ...], ...]
    pad_id: int
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: list[int]) -> SFTBatch:
        """The rows at `indices`, in that order."""
        prompts = pad_rows([list(self.prompt_ids[i]) for i in indices], self.pad_id, left=True)
        p_mask = pad_rows([[1] * len(self.prompt_ids[i]) for i in indices], 0, left=True)
        resp = pad_rows([list(self.response_ids[i]) for i in indices], self.pad_id, left=False)
        r_mask = pad_rows([[1] * len(self.response_ids[i]) for i in indices], 0, left=False)
        return SFTBatch(
            torch.cat([prompts, resp], 1), torch.cat([p_mask, r_mask], 1), r_mask.float()
        )

    def order(self, epoch: int, seed: int) -> list[int]:
        """A shuffled order of all rows, a pure function of (seed, epoch)."""
        out = list(range(len(self)))
        random.Random(seed * 1_000_003 + epoch).shuffle(out)
        return out


def check_chat(row: dict, where: str) -> list[dict[str, str]]:
    """At least two {role, content} messages, the last one the assistant's."""
    messages = check_messages(row["messages"], where)
    if len(messages) < 2:
        raise DataError(f"{where}: 'messages' must be a list of at least 2 messages")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must have role 'assistant'")
    return messages


def render(row: dict, where: str, tokenizer, templated: bool) -> tuple[str, list[int], list[int]]:
    """(prompt text, prompt ids, response ids without EOS) of a validated row."""
    if row.get("messages") is not None:
        messages = check_chat(row, where)
        prompt, response = messages[:-1], messages[-1]["content"]
    else:
        prompt, response = require_text(row, "prompt", where), require_text(row, "response", where)
    text, p_ids = render_prompt(tokenizer, prompt, templated, where)
    # Untemplated, the response continues the prompt text after a space.
    r_text = response if templated else " " + response
    return text, p_ids, tokenizer(r_text, add_special_tokens=False)["input_ids"]


def load_demonstrations(
    path: str | Path,
    tokenizer,
    max_len: int,
    on_bad_row: OnBadRow = "error",
    chat_template: ChatTemplateMode = "auto",
) -> SFTSet:
    """Read, validate and tokenize a demonstration file (see the module docstring)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    templated = use_template(tokenizer, chat_template)

    def tokenize(row: dict, where: str) -> tuple:
        text, p_ids, r_ids = render(row, where, tokenizer, templated)
        r_ids = r_ids + eos
        if len(p_ids) + len(r_ids) > max_len:
            raise DataError(
                f"{where}: prompt + response is {len(p_ids) + len(r_ids)} tokens, more than "
                f"data.max_len={max_len}"
            )
        return text, tuple(p_ids), tuple(r_ids)

    rows, skipped = read_rows(path, tokenize, on_bad_row, "demonstrations")
    texts, p_ids, r_ids = (tuple(col) for col in zip(*(r for _, r in rows)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    return SFTSet(texts, p_ids, r_ids, pad, len(skipped))


def synthetic_demonstrations(
    n: int, n_eval: int, seed: int = 0
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """`n` train and `n_eval` held-out rows {prompt, response} for the demo task.

    The response is the chosen side of a synthetic preference pair: a short sentence with kind
    words ("the cat looks warm and gentle."); held-out responses are ones training never saw.
    """
    from rayrlhf.data.synthetic import train_and_held_out

    train, held_out = train_and_held_out(n, n_eval, seed)
    return (
        [{"prompt": r["prompt"], "response": r["chosen"]} for r in train],
        [{"prompt": r["prompt"], "response": r["chosen"]} for r in held_out],
    )
