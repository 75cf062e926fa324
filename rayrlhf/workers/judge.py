"""Judge role (`reward.judge`): a generative judge, LLM-as-judge, on vLLM engines of its own.

    render   each (prompt, response) fills `template` ({prompt}: the policy's rendered prompt,
             {response}: the response text), optionally wrapped as one user turn in the judge
             tokenizer's chat template, and is encoded with the judge's own tokenizer
    generate greedily, `max_new_tokens` at most, on the judge's engines (`JudgeEngine`: the
             rollout role's `RolloutEngine`, built the same way from the judge's settings, in
             the judge's own placement group; the batch is split evenly over them)
    parse    the last match of `score_pattern` in the verdict; its group as a float is the raw
             score. No match, a group that is no finite number, or a judge prompt too long for
             the judge's context: no score (None)
    scale    (raw - min_score) / (max_score - min_score), clipped to [0, 1]; raw if both None

The reward actor calls the engines (`judge_calls`, `collect_verdicts`: a dead engine is a
`RoleFailed` of role 'judge', not of the reward actor) and turns their verdicts into one weighted
term (`judge_term`): a sample without a score is invalid (masked, counted in reward/invalid),
as a rule's None is. Two extras are logged with it: `judge_score`, the raw score (its mean over
valid samples), and `judge_unparsed`, the fraction of the batch with no score, written on every
sample so that the mean over valid samples that every extra gets is that fraction.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import ray
import torch

from rayrlhf.cluster.actors import ActorSet
from rayrlhf.cluster.waits import named_failure
from rayrlhf.config import JudgeConfig, RolloutConfig
from rayrlhf.types import timed
from rayrlhf.workers.reward_fns import TermScores
from rayrlhf.workers.rollout import RolloutEngine

JUDGE_SPEC = "reward.judge"
"""How the judge's term is named in errors and term lists."""


@dataclass(frozen=True)
class Verdict:
    """One judge output."""

    text: str
    """What the judge wrote ('' if its prompt did not fit its context)."""
    score: float | None
    """The parsed raw score; None when the verdict does not parse."""


def parse_score(pattern: re.Pattern, text: str) -> float | None:
    """The last match's group of `pattern` in `text` as a finite float, else None."""
    last = None
    for match in pattern.finditer(text):
        last = match
    if last is None or last.group(1) is None:
        return None
    try:
        value = float(last.group(1))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def scale(cfg: JudgeConfig, raw: float) -> float:
    """A raw score on the template's scale -> the term's value (see the module docstring)."""
    if cfg.min_score is None:
        return raw
    return min(1.0, max(0.0, (raw - cfg.min_score) / (cfg.max_score - cfg.min_score)))


def render(cfg: JudgeConfig, tokenizer, prompt: str, response: str) -> list[int]:
    """The judge's token ids for one (prompt, response)."""
    text = cfg.template.format(prompt=prompt, response=response)
    if not cfg.chat_template:
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    turn = [{"role": "user", "content": text}]
    text = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def engine_config(cfg: JudgeConfig) -> RolloutConfig:
    """The `RolloutConfig` a judge engine is built from: the judge's own settings."""
    return RolloutConfig(
        max_new_tokens=cfg.max_new_tokens,
        dtype=cfg.dtype,
        kv_cache_gib=cfg.kv_cache_gib,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        enforce_eager=cfg.enforce_eager,
        resources=cfg.resources,
        stop=list(cfg.stop),
    )


class JudgeEngine:
    """One judge engine (a Ray actor): a `RolloutEngine` on the judge model, greedy."""

    def __init__(self, cfg: JudgeConfig, seed: int, index: int) -> None:
        self.cfg, self.pattern = cfg, cfg.pattern()
        self.engine = RolloutEngine(cfg.model_path, engine_config(cfg), seed, index)
        self.tokenizer = self.engine.llm.get_tokenizer()
        if cfg.chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"reward.judge.chat_template: {cfg.model_path} has no chat template")
        self.context = self.engine.llm.llm_engine.model_config.max_model_len

    @timed
    def judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        """One greedy verdict per (prompt, response), in order."""
        ids = [render(self.cfg, self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        fits = [i for i, x in enumerate(ids) if len(x) + self.cfg.max_new_tokens <= self.context]
        texts = [""] * len(ids)
        if fits:
            out = self.engine.generate([ids[i] for i in fits], seed=0, greedy=True).value
            for i, sample in zip(fits, out):
                texts[i] = sample.text
        if len(fits) < len(ids):
            print(
                f"judge: {len(ids) - len(fits)} of {len(ids)} prompts leave no room for "
                f"max_new_tokens={self.cfg.max_new_tokens} in its context of {self.context}: "
                "no score",
                flush=True,
            )
        return [Verdict(t, parse_score(self.pattern, t) if t else None) for t in texts]


def start_judges(actors: ActorSet, cfg: JudgeConfig, seed: int) -> list:
    """The judge's `num_engines` engine actors, one bundle each of the judge's own placement
    group (role 'judge'); the caller waits for them (`ActorSet.wait_ready`)."""
    res, n = cfg.resources, cfg.num_engines
    return actors.start("judge", JudgeEngine, res, n, lambda i: (cfg, seed, i))


def judge_calls(engines: list, prompts: list[str], responses: list[str]) -> list:
    """Start the verdicts of a batch, split evenly over `engines`: refs in the batch's order
    (none without engines)."""
    m, n = len(engines), len(prompts)
    if not m:
        return []
    bounds = [n * i // m for i in range(m + 1)]
    return [
        e.judge.remote(prompts[a:b], responses[a:b])
        for e, a, b in zip(engines, bounds, bounds[1:])
        if b > a
    ]


def collect_verdicts(engines: list, refs: list) -> list:
    """The replies to `judge_calls(engines, ...)`. A judge engine that died or raised is a
    `RoleFailed` naming role 'judge' and its rank: the driver reports it, not the reward actor
    that waited on it (`waits.failure_of`)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayError as err:
        names = {e._actor_id.hex(): ("judge", i) for i, e in enumerate(engines)}
        raise named_failure(refs, err, "judge", lambda h: names.get(h, ("judge", -1)))  # noqa: B904


def judge_term(cfg: JudgeConfig, parts: list) -> TermScores:
    """The judge's term from its engines' `Timed[list[Verdict]]` parts, in order."""
    verdicts = [v for part in parts for v in part.value]
    raw = torch.tensor([math.nan if v.score is None else v.score for v in verdicts])
    scores = torch.tensor([math.nan if v.score is None else scale(cfg, v.score) for v in verdicts])
    unparsed = torch.isnan(raw).float().mean() if len(verdicts) else torch.tensor(0.0)
    extras = {"judge_score": raw, "judge_unparsed": torch.full_like(raw, unparsed.item())}
    return TermScores(scores, extras)
