"""The demo task: "answer with kind words".

Prompts ask about everyday topics. The gold rule scores a response by the fraction of its words
that come from `GOOD_WORDS`. A random-init policy says such words ~3% of the time, so the task is
learnable in a few dozen PPO steps on CPU, and progress is easy to read in the samples.

`positive_word_fraction` works as a rule reward
(`reward.rule: rayrlhf.data.demo_task:positive_word_fraction`); `make-tiny` also fits the
tiny reward model to it, so the HF reward-model path learns the same task.
"""

from __future__ import annotations

import random
import re

GOOD_WORDS = frozenset(
    "good great happy kind bright warm calm lovely nice gentle joyful brave sweet cheerful "
    "wonderful friendly".split()
)
TOPICS = (
    "the weather", "your day", "the cat", "a dog", "the city", "the garden", "music",
    "the sea", "a book", "the morning", "your friend", "the park", "dinner", "the school",
    "a trip", "the rain",
)  # fmt: skip
_TEMPLATES = ("Tell me about {}.", "Describe {}:", "Question: how is {}? Answer:")
_WORD = re.compile(r"[a-z]+")


def positive_word_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """Gold score in [0, 1]: the share of the response's words that are in `GOOD_WORDS`."""
    del prompts  # the rule judges the response alone
    scores = []
    for text in responses:
        words = _WORD.findall(text.lower())
        scores.append(sum(w in GOOD_WORDS for w in words) / len(words) if words else 0.0)
    return scores


def gold_score(prompts: list[str], responses: list[str], rows: list[dict]) -> list[float]:
    """`positive_word_fraction` as a reward function of the contract: the pipeline's gold
    scorer (`eval.gold`), judging the responses of a policy trained on a learned proxy."""
    del rows  # the demo task has no columns
    return positive_word_fraction(prompts, responses)


def demo_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` prompts drawn from the task's templates and topics, reproducibly."""
    rng = random.Random(seed)
    return [rng.choice(_TEMPLATES).format(rng.choice(TOPICS)) for _ in range(n)]
