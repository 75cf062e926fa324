"""Prompt sets for RL: the built-in demo task, or rows from JSONL, parquet or a `save_to_disk`
directory (`rayrlhf.data.sources`), rendered, tokenized and validated before any actor starts.

A row's prompt is text or a list of chat messages, under `data.prompt_key` (or
`data.messages_key`); it becomes token ids by `rayrlhf.data.chat`'s rule (`data.chat_template`).
Every other column of the row (an answer, a label, metadata) is kept unchanged and comes out with
its prompt in each `PromptBatch`, for rewards that need it.

A bad row is reported as `file:line: problem` (JSONL) or `file row i: problem` (parquet, arrow),
so a run never dies on step 900 because of row 9,000; `data.on_bad_row: skip` leaves bad rows out
and `data.overlong: drop` leaves out prompts over `data.max_prompt_tokens`, both counted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rayrlhf.config import DataConfig
from rayrlhf.data.chat import read_prompt, render_prompt, use_template
from rayrlhf.data.demo_task import demo_prompts
from rayrlhf.data.jsonl import DataError
from rayrlhf.data.sources import read_rows


@dataclass(frozen=True)
class PromptBatch:
    """The B prompts of one step (a prompt's repeats are contiguous rows)."""

    texts: list[str]
    """B prompt texts as the policy sees them (chat template applied, if on)."""
    ids: list[list[int]]
    """B prompt token ids: exactly what the engines receive."""
    columns: list[dict]
    """B rows' other columns, unchanged ({} for the demo task). Repeats share one dict: read,
    don't mutate."""

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ContextLimit:
    """The most prompt tokens the policy's context leaves beside a response
    (`rayrlhf.runtime.preflight.context_limit`)."""

    tokens: int
    """max_position_embeddings - rollout.max_new_tokens."""
    why: str
    """How it was reckoned, for the error naming an overlong row."""


@dataclass(frozen=True)
class PromptRow:
    """One checked, rendered row, before the length check."""

    where: str
    """"file:line", "file row i" or "demo prompts:n", for errors."""
    text: str
    ids: list[int]
    columns: dict


class PromptSet:
    """Tokenized prompts served in a reproducible shuffled order, epoch after epoch."""

    def __init__(
        self,
        texts: list[str],
        ids: list[list[int]],
        seed: int,
        columns: list[dict] | None = None,
    ) -> None:
        self.texts, self.ids, self.seed = texts, ids, seed
        self.columns = columns if columns is not None else [{} for _ in texts]
        self.skipped = self.dropped = 0
        """Bad rows left out (data.on_bad_row=skip); overlong prompts left out (overlong=drop)."""
        self._epoch, self._cached = -1, list[int]()

    @classmethod
    def load(
        cls, cfg: DataConfig, tokenizer, seed: int, context: ContextLimit | None = None
    ) -> PromptSet:
        """The prompts of `cfg.prompts`; bad or overlong rows (over data.max_prompt_tokens,
        or over what the model's `context` leaves) are errors naming the row unless `cfg`
        says to leave them out, and what was left out is printed."""
        templated = use_template(tokenizer, cfg.chat_template)
        if cfg.prompts == "demo":
            texts = demo_prompts(cfg.num_demo_prompts, seed)
            where = [f"demo prompts:{i + 1}" for i in range(len(texts))]
            rows = [_render({"prompt": t}, w, "prompt", "prompt", tokenizer, templated)
                    for t, w in zip(texts, where)]  # fmt: skip
            skipped = []
        else:

            def check(row: dict, where: str) -> PromptRow:
                key, messages_key = cfg.prompt_key, cfg.messages_key
                return _render(row, where, key, messages_key, tokenizer, templated)

            found, skipped = read_rows(cfg.prompts, check, cfg.on_bad_row, "prompts")
            rows = [r for _, r in found]
        kept = _fitting(rows, cfg, context)
        out = cls([r.text for r in kept], [r.ids for r in kept], seed, [r.columns for r in kept])
        out.skipped, out.dropped = len(skipped), len(rows) - len(kept)
        _report(cfg, out, skipped)
        return out

    def __len__(self) -> int:
        return len(self.texts)

    def draw(self, step: int, size: int, repeat: int = 1) -> PromptBatch:
        """The `size` prompts of `step`, each `repeat` times in a row; a pure function of
        (seed, step), so a resumed run sees the same."""
        return self.rows([i for i in self.indices(step, size) for _ in range(repeat)])

    def indices(self, step: int, size: int) -> list[int]:
        """The prompt indices (file order) that `draw(step, size)` serves: a run's ledger."""
        picks = []
        for k in range(step * size, (step + 1) * size):
            epoch, pos = divmod(k, len(self))
            picks.append(self._order(epoch)[pos])
        return picks

    def batch(self, step: int, size: int, repeat: int = 1) -> tuple[list[str], list[list[int]]]:
        """(texts, ids) of `draw(step, size, repeat)`."""
        drawn = self.draw(step, size, repeat)
        return drawn.texts, drawn.ids

    def rows(self, indices: list[int]) -> PromptBatch:
        """The prompts at `indices` (file order), e.g. `range(n)` for a fixed evaluation set."""
        return PromptBatch(
            [self.texts[i] for i in indices],
            [self.ids[i] for i in indices],
            [self.columns[i] for i in indices],
        )

    def _order(self, epoch: int) -> list[int]:
        """The shuffled prompt order of `epoch` (cached: consecutive steps share an epoch)."""
        if self._epoch != epoch:
            order = list(range(len(self)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch, self._cached = epoch, order
        return self._cached


def _render(
    row: dict, where: str, key: str, messages_key: str, tokenizer, templated: bool
) -> PromptRow:
    prompt, column = read_prompt(row, where, key, messages_key)
    text, ids = render_prompt(tokenizer, prompt, templated, where)
    return PromptRow(where, text, ids, {k: v for k, v in row.items() if k != column})


def _fitting(
    rows: list[PromptRow], cfg: DataConfig, context: ContextLimit | None = None
) -> list[PromptRow]:
    """The rows within data.max_prompt_tokens and the model's context; an overlong one is an
    error naming its row unless overlong=drop."""
    limit, why = cfg.max_prompt_tokens, f"data.max_prompt_tokens={cfg.max_prompt_tokens}"
    if context is not None and context.tokens < limit:
        limit, why = context.tokens, f"{context.tokens}: {context.why}"
    kept = [r for r in rows if len(r.ids) <= limit]
    if len(kept) < len(rows) and cfg.overlong == "error":
        r = next(r for r in rows if len(r.ids) > limit)
        raise DataError(
            f"{r.where}: prompt has {len(r.ids)} tokens, more than {why} "
            "(data.overlong=drop leaves such prompts out)"
        )
    if not kept:
        raise DataError(f"{cfg.prompts}: no prompt fits {why} (all {len(rows)} are longer)")
    return kept


def _report(cfg: DataConfig, prompts: PromptSet, skipped: list[str]) -> None:
    """One log line counting the rows left out, if any."""
    notes = []
    if skipped:
        notes.append(
            f"skipped {len(skipped)} bad row(s) (data.on_bad_row=skip; first: {skipped[0]})"
        )
    if prompts.dropped:
        notes.append(
            f"dropped {prompts.dropped} prompt(s) over data.max_prompt_tokens="
            f"{cfg.max_prompt_tokens} or the model's context (data.overlong=drop)"
        )
    if notes:
        print(f"prompts {cfg.prompts}: {len(prompts)} kept; " + "; ".join(notes), flush=True)
