"""Evaluation during PPO: every `eval.every_steps` steps, the engines answer a fixed held-out
prompt set (greedy by default) with the weights just synced, and the reward scores the answers.

    prompts   eval.prompts, read with data's settings (formats, chat template, bad rows,
              overlong), the first eval.num_prompts in file order, the same set each time;
              'demo' draws demo prompts with a seed of their own, apart from training's
    generate  Roles.generate(..., greedy=eval.greedy): one response per prompt
    score     the reward alone (model, rule or both): no reference, policy or critic pass
    gold      eval.gold, a reward function used for nothing but this, scores the same responses

The result is merged into the step's record as eval/* (metrics.jsonl, TensorBoard,
Prometheus, the plots): eval/reward_mean, eval/reward_std, eval/response_length,
eval/num_prompts, eval/seconds, eval/reward/<extra> for the reward's extras, and eval/gold,
eval/gold/<extra> with eval.gold. eval.at_start adds one evaluation of the starting policy
before the first step, as a record of its own at step -1.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Protocol

import torch

from rayrlhf.algorithms.experience import assemble_rollout
from rayrlhf.config import ConfigError, TrainConfig
from rayrlhf.data.prompts import PromptBatch, PromptSet
from rayrlhf.runtime.preflight import context_limit
from rayrlhf.types import RewardOutput, Rollout, Sample
from rayrlhf.workers.reward_fns import RewardFn, TermScores, load_reward_fn

EVAL_SEED_OFFSET = 7_919
"""Demo eval prompts use seed + this, so they are drawn apart from the training prompts."""
EVAL_SAMPLING_SEED = 10**9
"""Sampled (non-greedy) eval responses use seeds from here on, apart from training's."""
SAMPLES_FILE = "eval_samples.jsonl"
"""Every evaluation's responses, in the run directory (`Evaluator.write_samples`)."""


class EvalRoles(Protocol):
    """What evaluation needs of a run's roles (`rayrlhf.recipes.ppo_roles.Roles`)."""

    def generate(
        self, prompt_ids: list[list[int]], seed: int, greedy: bool = False, timer=None
    ) -> list[Sample]: ...

    def rewards(self, rollout: Rollout) -> RewardOutput: ...


def load_eval_prompts(cfg: TrainConfig, tokenizer) -> PromptBatch:
    """The fixed evaluation set: eval.prompts read with data's settings, the first
    eval.num_prompts of it. Called before Ray starts, so a bad row costs seconds."""
    ev = cfg.eval
    if ev.prompts != "demo" and not Path(ev.prompts).exists():
        raise ConfigError(f"invalid config:\n  eval.prompts: path does not exist: {ev.prompts}")
    data = cfg.data.model_copy(update={"prompts": ev.prompts, "num_demo_prompts": ev.num_prompts})
    prompts = PromptSet.load(data, tokenizer, cfg.seed + EVAL_SEED_OFFSET, context_limit(cfg))
    return prompts.rows(list(range(min(ev.num_prompts, len(prompts)))))


def eval_record(
    rewards: torch.Tensor, samples: list[Sample], accuracy: torch.Tensor | None = None
) -> dict[str, float]:
    """eval/* of one evaluation: the valid samples' rewards (any number, NaN mean and std when
    none is valid) and all the samples; `accuracy` [B] in {0, 1} when the reward judges
    correctness (the hook for rewards that report it)."""
    lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float32)
    empty = rewards.numel() == 0  # torch's std of nothing warns before giving NaN
    rec = {
        "eval/reward_mean": math.nan if empty else rewards.mean().item(),
        "eval/reward_std": math.nan if empty else rewards.std(unbiased=False).item(),
        "eval/response_length": lengths.mean().item(),
        "eval/num_prompts": len(samples),
    }
    if accuracy is not None:
        rec["eval/accuracy"] = accuracy.float().mean().item()
    return rec


def gold_record(gold: TermScores) -> dict[str, float]:
    """eval/gold (the gold function's mean score) and eval/gold/<extra> (each extra's mean),
    over the samples it scored (NaN: unscored, left out); eval/gold/invalid counts those."""
    rec = {"eval/gold": gold.scores.nanmean().item()}
    rec |= {f"eval/gold/{k}": v.nanmean().item() for k, v in gold.extras.items()}
    rec["eval/gold/invalid"] = float(gold.scores.isnan().sum().item())
    return rec


class Evaluator:
    """Runs the evaluation when a step is due; holds the prompts, loaded at construction."""

    def __init__(self, cfg: TrainConfig, tokenizer, pad_id: int) -> None:
        self.cfg, self.pad_id, self.seed = cfg.eval, pad_id, cfg.seed
        on = cfg.eval.every_steps or cfg.eval.at_start
        self.prompts = load_eval_prompts(cfg, tokenizer) if on else None
        # Loaded now, before Ray starts, so a bad spec costs seconds.
        self.gold: RewardFn | None = load_reward_fn(cfg.eval.gold) if cfg.eval.gold else None
        self.samples_path = Path(cfg.run_dir) / SAMPLES_FILE

    def due(self, step: int) -> bool:
        """After steps N, 2N, ... (0-based `step` counts N-1, 2N-1, ...)."""
        every = self.cfg.every_steps
        return bool(every) and (step + 1) % every == 0

    def __call__(self, roles: EvalRoles, step: int) -> dict[str, float]:
        """eval/* after `step`, or {} when the step is not due."""
        return self.evaluate(roles, step) if self.due(step) else {}

    def at_start(self, roles: EvalRoles, write) -> dict[str, float]:
        """eval.at_start: the starting policy's eval/* as a record of its own at step -1 (0 steps
        done), handed to `write` (the run's metrics writer) and printed; {} when off."""
        if not self.cfg.at_start:
            return {}
        rec = {"step": -1, **self.evaluate(roles, -1)}
        write(rec)
        print(
            f"eval before PPO | reward {rec['eval/reward_mean']:+.3f} "
            f"| len {rec['eval/response_length']:.1f} | {rec['eval/num_prompts']} prompts "
            f"| {rec['eval/seconds']:.1f}s",
            flush=True,
        )
        return rec

    def evaluate(self, roles: EvalRoles, step: int) -> dict[str, float]:
        """eval/* of the policy after `step` (-1: the starting policy), due or not."""
        start = time.perf_counter()
        p = self.prompts
        seed = EVAL_SAMPLING_SEED + self.seed * 1_000_003 + step * len(p)  # sampled evals only
        samples = roles.generate(p.ids, seed=seed, greedy=self.cfg.greedy)
        rollout = assemble_rollout(samples, p.texts, self.pad_id, p.columns)
        reward = roles.rewards(rollout)
        rec = eval_record(reward.scores[reward.valid], samples)  # the mean of valid samples
        rec |= {f"eval/reward/{k}": v for k, v in reward.summary().items()}
        gold = self.gold and self.gold(rollout.prompts, rollout.responses, rollout.rows)
        if gold is not None:
            rec |= gold_record(gold)
        self.write_samples(step + 1, rollout, reward, gold)
        rec["eval/seconds"] = time.perf_counter() - start
        return rec

    def write_samples(
        self, done: int, rollout: Rollout, reward: RewardOutput, gold: TermScores | None
    ) -> None:
        """Append the evaluation's responses to run_dir/eval_samples.jsonl, one line each:
        step (steps done), prompt, response, reward and gold (null: invalid or no gold)."""
        rewards = torch.where(reward.valid, reward.scores, math.nan).tolist()
        golds = gold.scores.tolist() if gold is not None else [math.nan] * len(rollout)
        self.samples_path.parent.mkdir(parents=True, exist_ok=True)
        with self.samples_path.open("a") as f:
            for prompt, response, r, g in zip(rollout.prompts, rollout.responses, rewards, golds):
                row = {"step": done, "prompt": prompt, "response": response}
                row |= {"reward": _finite(r), "gold": _finite(g)}
                f.write(json.dumps(row) + "\n")


def _finite(x: float) -> float | None:
    """x, or None for NaN (JSON has no NaN)."""
    return x if math.isfinite(x) else None
