"""Where rewards come from: rule functions, a remote scorer, a reward model, weighted."""

from __future__ import annotations

from pydantic import Field, model_validator

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
    micro_batch_size: int = Field(16, ge=1)
    """Sequences per reward-model forward pass."""
    resources: Resources = Resources()
    """Resources of the reward actor."""

    @model_validator(mode="after")
    def _one_source(self) -> RewardConfig:
        if self.model_path is None and not self.all_rules() and self.remote is None:
            raise ValueError("set reward.model_path, reward.rule(s) or reward.remote (or several)")
        if self.rule is not None and ":" not in self.rule:
            raise ValueError(f"reward.rule must look like 'module:function', got {self.rule!r}")
        return self

    def all_rules(self) -> list[RuleSpec]:
        """`rule` (weight 1) followed by `rules`."""
        first = [RuleSpec.model_construct(fn=self.rule, weight=1.0)] if self.rule else []
        return first + list(self.rules)
