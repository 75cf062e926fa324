"""Reward role: the weighted sum of a frozen HF scalar reward model, reward functions
(`reward.rule`, `reward.rules`), a remote scorer (`reward.remote`) and a generative judge
(`reward.judge`, whose engines are actors of their own: `rayrlhf.workers.judge`), per the
contract of `rayrlhf.workers.reward_fns`. The judge's verdicts are started first and collected
last, so they overlap the reward model and the functions.

The reward model reads the policy's token ids when its tokenizer is the policy's (same
vocabulary). Otherwise each sample is decoded to (prompt text, response text) and re-encoded with
the reward model's own tokenizer: through its chat template (user turn, assistant turn) if it has
one, else as the concatenated text with its special tokens. The prompt text is the policy's
rendered prompt (`Rollout.prompts`).
"""

from __future__ import annotations

import asyncio

import torch
from transformers import AutoTokenizer

from rayrlhf.config import RewardConfig
from rayrlhf.models.forward import sequence_scores
from rayrlhf.models.frozen import load_frozen
from rayrlhf.models.tokenizer import pad_id
from rayrlhf.types import RewardOutput, Rollout, pad_rows, timed
from rayrlhf.workers.judge import JUDGE_SPEC, collect_verdicts, judge_calls, judge_term
from rayrlhf.workers.reward_fns import (
    RewardFn,
    TermScores,
    combine,
    load_reward_fn,
    score_terms,
)

MODEL_SPEC = "reward.model_path"
"""How the reward model's term is named in errors and term lists."""


def resolve_rule(spec: str) -> RewardFn:
    """Import `module:function`; a clear ValueError if either part is missing (pre-flight)."""
    try:
        return load_reward_fn(spec)
    except RuntimeError as err:
        raise ValueError(str(err)) from None


class RetokenizedRM:
    """A reward model whose tokenizer differs from the policy's: scores decoded text."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.pad_id = pad_id(tokenizer)

    def encode(self, prompt: str, response: str) -> list[int]:
        """The reward model's ids of one (prompt, response)."""
        tok = self.tokenizer
        if not self.templated:
            return tok(prompt + response, add_special_tokens=True)["input_ids"]
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        text = tok.apply_chat_template(turns, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    def batch(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, T'] ids, [B, T'] mask) in the reward model's vocabulary, right-padded."""
        ids = [self.encode(p, r) for p, r in zip(rollout.prompts, rollout.responses)]
        return pad_rows(ids, self.pad_id, left=False), pad_rows(
            [[1] * len(i) for i in ids], 0, False
        )


class RewardWorker:
    """Scores whole sequences: one `RewardOutput` per rollout."""

    def __init__(
        self,
        cfg: RewardConfig,
        num_threads: int,
        policy_path: str | None = None,
        judges: list | None = None,
    ) -> None:
        """`judges`: the `JudgeEngine` actors of `reward.judge` (`start_judges`), if it is set."""
        if cfg.judge is not None and not judges:
            raise ValueError("reward.judge is set but no judge engines were started for it")
        torch.set_num_threads(num_threads)
        self.judges = list(judges or [])
        self.cfg, self.micro_batch_size = cfg, cfg.micro_batch_size
        # On its GPU, split over its GPUs if the bundle holds several, or on the CPU.
        self.model = load_frozen("reward", cfg.model_path) if cfg.model_path else None
        self.retokenize = (
            own_tokenizer(cfg.model_path, policy_path) if cfg.model_path and policy_path else None
        )
        self.fns = [load_reward_fn(r.fn, r.weight) for r in cfg.all_rules()]
        if cfg.remote is not None:
            from rayrlhf.workers.reward_client import RemoteReward

            self.fns.append(RewardFn(cfg.remote.url, RemoteReward(cfg.remote), cfg.remote.weight))
        # One loop for the actor's life: an async client may keep connections bound to it.
        self.loop = asyncio.new_event_loop()

    @timed
    @torch.no_grad()
    def score(self, rollout: Rollout) -> RewardOutput:
        """The weighted reward of every row, its validity and the functions' extras."""
        verdicts = judge_calls(self.judges, rollout.prompts, rollout.responses)
        terms = []
        if self.model is not None:
            terms.append(
                (MODEL_SPEC, self.cfg.model_weight, TermScores(self.model_scores(rollout), {}))
            )
        if self.fns:
            calls = score_terms(self.fns, rollout.prompts, rollout.responses, rollout.rows)
            scores = self.loop.run_until_complete(calls)
            terms += [(f.spec, f.weight, s) for f, s in zip(self.fns, scores)]
        if verdicts:
            term = judge_term(self.cfg.judge, collect_verdicts(self.judges, verdicts))
            terms.append((JUDGE_SPEC, self.cfg.judge.weight, term))
        return combine(terms)

    def model_scores(self, rollout: Rollout) -> torch.Tensor:
        """[B] reward-model scores, on the policy's ids or re-encoded ones."""
        seqs, mask = self.encoded(rollout)
        size = self.micro_batch_size
        return torch.cat(
            [
                sequence_scores(self.model, seqs[i : i + size], mask[i : i + size]).cpu()
                for i in range(0, len(seqs), size)
            ]
        )

    def encoded(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """The (ids, mask) the reward model reads for `rollout` (for tests and debugging)."""
        if self.retokenize is not None:
            return self.retokenize.batch(rollout)
        return rollout.sequences, rollout.attention_mask


def own_tokenizer(model_path: str, policy_path: str) -> RetokenizedRM | None:
    """A `RetokenizedRM` if the reward model's tokenizer maps tokens to ids differently from
    the policy's; None if they agree (or the reward model has no tokenizer of its own)."""
    try:
        rm_tok = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError):
        return None  # no tokenizer saved with it: it reads the policy's ids
    if rm_tok.get_vocab() == AutoTokenizer.from_pretrained(policy_path).get_vocab():
        return None
    print(f"reward model {model_path}: own tokenizer; responses are re-encoded for it", flush=True)
    return RetokenizedRM(rm_tok)
