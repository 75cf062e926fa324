"""Prompt sets for RL: the built-in demo task or a JSONL file, tokenized and validated up front.

A bad row is reported as `file:line: problem` before any actor starts, so a run never dies on
step 900 because of row 9,000.
"""

from __future__ import annotations

import random
from pathlib import Path

from rayrlhf.config import DataConfig
from rayrlhf.data.demo_task import demo_prompts
from rayrlhf.data.jsonl import DataError, read_jsonl, require_text


def read_jsonl_prompts(path: Path, key: str) -> list[tuple[int, str]]:
    """(line number, prompt) for every non-blank line of a JSONL file; bad rows name file:line."""
    rows, _ = read_jsonl(path, lambda row, where: require_text(row, key, where), what="prompts")
    return rows


class PromptSet:
    """Tokenized prompts served in a reproducible shuffled order, epoch after epoch."""

    def __init__(self, texts: list[str], ids: list[list[int]], seed: int) -> None:
        self.texts, self.ids, self.seed = texts, ids, seed
        self._epoch, self._cached = -1, list[int]()

    @classmethod
    def load(cls, cfg: DataConfig, tokenizer, seed: int) -> PromptSet:
        if cfg.prompts == "demo":
            rows = [(i + 1, p) for i, p in enumerate(demo_prompts(cfg.num_demo_prompts, seed))]
            where = "demo prompts"
        else:
            rows = read_jsonl_prompts(Path(cfg.prompts), cfg.prompt_key)
            where = cfg.prompts
        texts, ids = [], []
        for line, text in rows:
            tokens = tokenizer(text, add_special_tokens=True)["input_ids"]
            if len(tokens) > cfg.max_prompt_tokens:
                raise DataError(
                    f"{where}:{line}: prompt has {len(tokens)} tokens, more than "
                    f"data.max_prompt_tokens={cfg.max_prompt_tokens}"
                )
            texts.append(text)
            ids.append(tokens)
        return cls(texts, ids, seed)

    def __len__(self) -> int:
        return len(self.texts)

    def batch(self, step: int, size: int, repeat: int = 1) -> tuple[list[str], list[list[int]]]:
        """The `size` prompts of `step`, each `repeat` times in a row; a pure function of
        (seed, step), so a resumed run sees the same."""
        picks = []
        for k in range(step * size, (step + 1) * size):
            epoch, pos = divmod(k, len(self))
            picks.append(self._order(epoch)[pos])
        picks = [i for i in picks for _ in range(repeat)]
        return [self.texts[i] for i in picks], [self.ids[i] for i in picks]

    def _order(self, epoch: int) -> list[int]:
        """The shuffled prompt order of `epoch` (cached: consecutive steps share an epoch)."""
        if self._epoch != epoch:
            order = list(range(len(self)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch, self._cached = epoch, order
        return self._cached
