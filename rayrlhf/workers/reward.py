"""Reward role: a frozen HF scalar reward model, a rule `module:function`, or their sum."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from rayrlhf.models.forward import sequence_scores
from rayrlhf.models.frozen import load_frozen
from rayrlhf.types import Rollout, micro_batches, timed

RuleFn = Callable[[list[str], list[str]], list[float]]


def resolve_rule(spec: str) -> RuleFn:
    """Import `module:function`; a clear error if either part is missing."""
    module_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward.rule {spec!r} cannot be loaded: {err}") from None
    if not callable(fn):
        raise ValueError(f"reward.rule {spec!r} is not callable")
    return fn


class RewardWorker:
    """Scores whole sequences; one float per rollout row."""

    def __init__(
        self, model_path: str | None, rule: str | None, micro_batch_size: int, num_threads: int
    ) -> None:
        torch.set_num_threads(num_threads)
        # On its GPU, split over its GPUs if the bundle holds several, or on the CPU.
        self.model = load_frozen("reward", model_path) if model_path is not None else None
        self.rule = resolve_rule(rule) if rule else None
        self.micro_batch_size = micro_batch_size

    @timed
    @torch.no_grad()
    def score(self, rollout: Rollout) -> torch.Tensor:
        """[B] rewards: model score plus rule score. NaN or inf stops the run with the row."""
        total = torch.zeros(len(rollout))
        if self.model is not None:
            total += torch.cat(
                [
                    sequence_scores(self.model, mb.sequences, mb.attention_mask).cpu()
                    for mb in micro_batches(rollout, self.micro_batch_size)
                ]
            )
            _check(total, rollout, "reward model")
        if self.rule is not None:
            rule = torch.tensor(
                self.rule(list(rollout.prompts), list(rollout.responses)), dtype=torch.float32
            )
            if rule.shape != (len(rollout),):
                raise ValueError(
                    f"reward rule returned shape {tuple(rule.shape)}, expected ({len(rollout)},)"
                )
            _check(rule, rollout, "reward rule")
            total += rule
        return total


def _check(scores: torch.Tensor, rollout: Rollout, source: str) -> None:
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise FloatingPointError(
            f"{source} gave {scores[i].item()} for {len(bad)} row(s); first: prompt "
            f"{rollout.prompts[i]!r}, response {rollout.responses[i]!r}"
        )
