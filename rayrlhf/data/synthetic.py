"""Synthetic preference pairs for the demo task ("answer with kind words").

Each pair answers a demo prompt twice with the same short sentence frame: the chosen response
fills it with words from `GOOD_WORDS`, the rejected one with words from `BAD_WORDS`, e.g.
"it is warm and kind." vs "it is cold and grim.". So the only preference signal is the one the
gold rule scores. `gold_score` is that rule; training never sees it, evaluation may.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rayrlhf.data.demo_task import GOOD_WORDS, demo_prompts, positive_word_fraction

BAD_WORDS = frozenset(
    "bad sad cold grim dull awful nasty harsh bitter cruel gloomy lazy dark empty".split()
)
# Frames use neither set, so a chosen response scores > 0 and a rejected one exactly 0.
_SUBJECTS = ("it", "the day", "my friend", "the cat", "the city", "the sea", "our team")
_VERBS = ("is", "was", "seems", "looks", "feels")


def _sentence(subject: str, verb: str, words: list[str]) -> str:
    """'it is warm.', 'it is warm and kind.' (one or two adjectives)."""
    return f"{subject} {verb} {' and '.join(words)}."


def preference_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` rows {prompt, chosen, rejected}, reproducible from `seed`; chosen != rejected."""
    rng = random.Random(seed)
    good, bad = sorted(GOOD_WORDS), sorted(BAD_WORDS)
    rows = []
    for prompt in demo_prompts(n, seed):
        subject, verb, k = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.randint(1, 2)
        rows.append(
            {
                "prompt": prompt,
                "chosen": _sentence(subject, verb, rng.sample(good, k)),
                "rejected": _sentence(subject, verb, rng.sample(bad, k)),
            }
        )
    return rows


def train_and_held_out(
    n: int, n_eval: int, seed: int = 0
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """`n` training pairs and up to `n_eval` held-out ones whose responses training never saw."""
    train = preference_pairs(n, seed)
    seen = {row[k] for row in train for k in ("chosen", "rejected")}
    candidates = preference_pairs(20 * n_eval, seed + 1)
    held_out = [r for r in candidates if r["chosen"] not in seen and r["rejected"] not in seen]
    return train, held_out[:n_eval]


def write_jsonl(rows: list[dict[str, str]], path: str | Path) -> Path:
    """Write one JSON object per line (creating parent directories); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def gold_score(prompts: list[str], responses: list[str]) -> list[float]:
    """The demo task's gold rule: the share of a response's words that are kind words."""
    return positive_word_fraction(prompts, responses)


def kto_rows(pairs: list[dict[str, str]]) -> list[dict]:
    """KTO rows {prompt, completion, label} from pairs: the chosen (kind-words) response as a
    desirable row, the rejected (unkind) one as an undesirable row, as TRL's
    `unpair_preference_dataset` does."""
    return [
        {"prompt": row["prompt"], "completion": row[side], "label": side == "chosen"}
        for row in pairs
        for side in ("chosen", "rejected")
    ]


def kto_train_and_held_out(n: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """`train_and_held_out`'s pairs as KTO rows: 2n training rows and up to 2 n_eval held-out
    ones, the same texts the pair losses see."""
    train, held_out = train_and_held_out(n, n_eval, seed)
    return kto_rows(train), kto_rows(held_out)
