"""Where rewards come from: rule functions, a remote scorer, a reward model, a generative
judge, weighted."""

from __future__ import annotations

import re
import string
from typing import Literal

from pydantic import Field, field_validator, model_validator

from rayrlhf.config.base import Resources, Section


class RuleSpec(Section):
    fn: str
    """A reward function 'module:function' (`rayrlhf.workers.reward_fns`): called with the
    batch's prompts, responses and rows (or, legacy, prompts and responses), sync or async,
    returning per sample a float or a dict with a float `score` and named float extras."""
    weight: float = 1.0
    """Its weight in the reward: the sum over terms of weight x score."""

    @model_validator(mode="after")
    def _spec(self) -> RuleSpec:
        if ":" not in self.fn:
            raise ValueError(f"a reward rule must look like 'module:function', got {self.fn!r}")
        return self


class RemoteRewardConfig(Section):
    url: str
    """Scorer endpoint, http://host:port/score (`rayrlhf serve-reward`; JSON schema in
    docs/rewards.md)."""
    weight: float = 1.0
    """Its weight in the reward: the sum over terms of weight x score."""
    timeout_s: float = Field(30.0, gt=0)
    """Seconds one request may take before it counts as failed."""
    retries: int = Field(2, ge=0)
    """Further attempts after a failed request; then the run stops with an error naming the
    URL."""
    backoff_s: float = Field(0.5, ge=0)
    """Seconds before the first retry, doubling for each further one."""
    max_concurrency: int = Field(4, ge=1)
    """Requests in flight at once."""
    batch_size: int = Field(64, ge=1)
    """Samples per request: a batch is split into requests of at most this many."""

    @model_validator(mode="after")
    def _http(self) -> RemoteRewardConfig:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"reward.remote.url must start with http:// or https://: {self.url!r}")
        return self


JUDGE_FIELDS = frozenset({"prompt", "response"})
"""The placeholders a judge template may use."""
DEFAULT_JUDGE_TEMPLATE = (
    "Rate the response to the prompt from 1 (useless) to 10 (excellent).\n\n"
    "Prompt: {prompt}\n\nResponse: {response}\n\nAnswer with 'Score: <1-10>'.\n"
)
DEFAULT_SCORE_PATTERN = r"(?:score|rating)\s*[:=]?\s*(-?\d+(?:\.\d+)?)"


def template_fields(template: str) -> set[str]:
    """The placeholders of a `str.format` template; ValueError for a malformed one."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    if "" in fields or any(f.isdigit() for f in fields):
        raise ValueError("positional placeholders ({} or {0}) are not allowed; name them")
    return fields


class JudgeConfig(Section):
    """A generative judge (LLM-as-judge): a vLLM engine of its own writes a verdict for each
    (prompt, response), greedily, and a regex reads the score from it
    (`rayrlhf.workers.judge`)."""

    model_path: str
    """HF directory of the judge model (vLLM loads it; it reads text with its own tokenizer)."""
    weight: float = 1.0
    """Its weight in the reward: the sum over terms of weight x score."""
    template: str = DEFAULT_JUDGE_TEMPLATE
    """The judge's prompt, a `str.format` template with {prompt} and {response} (the policy's
    rendered prompt and the response text); literal braces are written {{ and }}."""
    chat_template: bool = False
    """Wrap the filled template as one user turn in the judge tokenizer's chat template (with
    the generation prompt); False: the text as it is, with the tokenizer's special tokens."""
    score_pattern: str = DEFAULT_SCORE_PATTERN
    """Regex with one group, searched case-insensitively in the judge's output; its last match's
    group is the score. No match, or a group that is not a finite number: no score (the sample
    is invalid, counted in reward/invalid and reward/judge_unparsed)."""
    min_score: float | None = 1.0
    """The lowest score of the template's scale: scores map to [0, 1] by (s - min) / (max - min),
    clipped. None, with max_score None: the raw score is the term."""
    max_score: float | None = 10.0
    """The highest score of the template's scale (see min_score)."""
    max_new_tokens: int = Field(64, ge=1)
    """Most tokens of one verdict."""
    stop: list[str] = []
    """Stop strings of a verdict (vLLM's `stop`), e.g. a newline after the score."""
    num_engines: int = Field(1, ge=1)
    """vLLM engines of the judge, one actor each; a batch is split evenly over them."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """vLLM compute dtype; 'auto' takes the checkpoint's."""
    kv_cache_gib: float | None = Field(0.25, gt=0)
    """KV-cache size in GiB of each engine (CPU engines need it); None: gpu_memory_utilization."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """Fraction of GPU memory each engine may use (GPU engines, when kv_cache_gib is None)."""
    enforce_eager: bool = True
    """Skip CUDA-graph capture (faster start-up)."""
    resources: Resources = Resources()
    """Resources of each judge engine's actor, in the judge's own placement group (one bundle
    per engine; tensor parallel size 1, so at most one GPU)."""

    @field_validator("template")
    @classmethod
    def _placeholders(cls, template: str) -> str:
        fields = template_fields(template)
        if unknown := fields - JUDGE_FIELDS:
            raise ValueError(
                f"unknown placeholders {sorted(unknown)}: the template may use {{prompt}} and "
                "{response} (write a literal brace as {{ or }})"
            )
        if "response" not in fields:
            raise ValueError("the template must contain {response}: the judge would not see it")
        return template

    @field_validator("score_pattern")
    @classmethod
    def _one_group(cls, pattern: str) -> str:
        try:
            groups = re.compile(pattern).groups
        except re.error as err:
            raise ValueError(f"not a regular expression: {err}") from None
        if groups != 1:
            raise ValueError(f"needs exactly one group (the score), has {groups}: {pattern!r}")
        return pattern

    @field_validator("resources")
    @classmethod
    def _engine_resources(cls, res: Resources) -> Resources:
        if res.num_threads is not None:
            raise ValueError("vLLM binds its own threads: set VLLM_CPU_OMP_THREADS_BIND instead")
        if res.num_gpus > 1:
            raise ValueError("a judge engine runs tensor parallel 1: at most one GPU each")
        return res

    @model_validator(mode="after")
    def _scale(self) -> JudgeConfig:
        if (self.min_score is None) != (self.max_score is None):
            raise ValueError("set both min_score and max_score (scaled to [0, 1]) or neither (raw)")
        if self.min_score is not None and not self.min_score < self.max_score:
            raise ValueError(f"min_score {self.min_score} must be below max_score {self.max_score}")
        return self

    def pattern(self) -> re.Pattern:
        """`score_pattern`, compiled case-insensitively."""
        return re.compile(self.score_pattern, re.IGNORECASE)


class RewardConfig(Section):
    model_path: str | None = None
    """HF directory of a one-label sequence-classification reward model. If its tokenizer
    differs from the policy's, responses are decoded and re-encoded with its own (and its chat
    template, if it has one)."""
    model_weight: float = 1.0
    """Weight of the reward model's score in the reward."""
    rule: str | None = None
    """One reward function 'module:function' with weight 1: shorthand for one entry of
    `rules` (it comes first)."""
    rules: list[RuleSpec] = []
    """Reward functions and their weights (`RuleSpec`), each one more term of the reward."""
    remote: RemoteRewardConfig | None = None
    """A reward server scored over HTTP, one more weighted term (`RemoteRewardConfig`)."""
    judge: JudgeConfig | None = None
    """A generative judge on vLLM engines of its own, one more weighted term (`JudgeConfig`)."""
    micro_batch_size: int = Field(16, ge=1)
    """Sequences per reward-model forward pass."""
    resources: Resources = Resources()
    """Resources of the reward actor."""

    @model_validator(mode="after")
    def _one_source(self) -> RewardConfig:
        sources = (self.model_path, self.remote, self.judge)
        if all(s is None for s in sources) and not self.all_rules():
            raise ValueError(
                "set reward.model_path, reward.rule(s), reward.remote or reward.judge (or several)"
            )
        if self.rule is not None and ":" not in self.rule:
            raise ValueError(f"reward.rule must look like 'module:function', got {self.rule!r}")
        return self

    def all_rules(self) -> list[RuleSpec]:
        """`rule` (weight 1) followed by `rules`."""
        first = [RuleSpec.model_construct(fn=self.rule, weight=1.0)] if self.rule else []
        return first + list(self.rules)
