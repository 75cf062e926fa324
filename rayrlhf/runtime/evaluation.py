"""Evaluation during PPO: every `eval.every_steps` steps, the engines answer a fixed held-out
prompt set (greedy by default) with the weights just synced, and the reward scores the answers.

    prompts   eval.prompts, read with data's settings (formats, chat template, bad rows,
              overlong), the first eval.num_prompts in file order, the same set each time;
              'demo' draws demo prompts with a seed of their own, apart from training's
    generate  Roles.generate(..., greedy=eval.greedy): one response per prompt
    score     the reward alone (model, rule or both): no reference, policy or critic pass

The result is merged into the step's record as eval/* (metrics.jsonl, TensorBoard,
Prometheus, the plots): eval/reward_mean, eval/reward_std, eval/response_length,
eval/num_prompts, eval/seconds, and eval/accuracy once the reward reports one per row.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import torch

from rayrlhf.algorithms.experience import assemble_rollout
from rayrlhf.config import ConfigError, TrainConfig
from rayrlhf.data.prompts import PromptBatch, PromptSet
from rayrlhf.types import Rollout, Sample

EVAL_SEED_OFFSET = 7_919
"""Demo eval prompts use seed + this, so they are drawn apart from the training prompts."""
EVAL_SAMPLING_SEED = 10**9
"""Sampled (non-greedy) eval responses use seeds from here on, apart from training's."""


class EvalRoles(Protocol):
    """What evaluation needs of a run's roles (`rayrlhf.recipes.ppo_roles.Roles`)."""

    def generate(
        self, prompt_ids: list[list[int]], seed: int, greedy: bool = False, timer=None
    ) -> list[Sample]: ...

    def rewards(self, rollout: Rollout) -> torch.Tensor: ...


def load_eval_prompts(cfg: TrainConfig, tokenizer) -> PromptBatch:
    """The fixed evaluation set: eval.prompts read with data's settings, the first
    eval.num_prompts of it. Called before Ray starts, so a bad row costs seconds."""
    ev = cfg.eval
    if ev.prompts != "demo" and not Path(ev.prompts).exists():
        raise ConfigError(f"invalid config:\n  eval.prompts: path does not exist: {ev.prompts}")
    data = cfg.data.model_copy(update={"prompts": ev.prompts, "num_demo_prompts": ev.num_prompts})
    prompts = PromptSet.load(data, tokenizer, cfg.seed + EVAL_SEED_OFFSET)
    return prompts.rows(list(range(min(ev.num_prompts, len(prompts)))))


def eval_record(
    rewards: torch.Tensor, samples: list[Sample], accuracy: torch.Tensor | None = None
) -> dict[str, float]:
    """eval/* of one evaluation: [B] rewards and the B samples they score; `accuracy` [B] in
    {0, 1} when the reward judges correctness (the hook for rewards that report it)."""
    lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float32)
    rec = {
        "eval/reward_mean": rewards.mean().item(),
        "eval/reward_std": rewards.std(unbiased=False).item(),
        "eval/response_length": lengths.mean().item(),
        "eval/num_prompts": len(samples),
    }
    if accuracy is not None:
        rec["eval/accuracy"] = accuracy.float().mean().item()
    return rec


class Evaluator:
    """Runs the evaluation when a step is due; holds the prompts, loaded at construction."""

    def __init__(self, cfg: TrainConfig, tokenizer, pad_id: int) -> None:
        self.cfg, self.pad_id, self.seed = cfg.eval, pad_id, cfg.seed
        self.prompts = load_eval_prompts(cfg, tokenizer) if cfg.eval.every_steps else None

    def due(self, step: int) -> bool:
        """After steps N, 2N, ... (0-based `step` counts N-1, 2N-1, ...)."""
        every = self.cfg.every_steps
        return bool(every) and (step + 1) % every == 0

    def __call__(self, roles: EvalRoles, step: int) -> dict[str, float]:
        """eval/* after `step`, or {} when the step is not due."""
        if not self.due(step):
            return {}
        start = time.perf_counter()
        p = self.prompts
        seed = EVAL_SAMPLING_SEED + self.seed * 1_000_003 + step * len(p)  # sampled evals only
        samples = roles.generate(p.ids, seed=seed, greedy=self.cfg.greedy)
        rollout = assemble_rollout(samples, p.texts, self.pad_id)
        rec = eval_record(roles.rewards(rollout), samples)
        rec["eval/seconds"] = time.perf_counter() - start
        return rec
