"""Best-of-N sampling: n responses per prompt from the vLLM engines, the reward actor picks one.

A sample whose reward is invalid (its function gave None or NaN) is never picked; a prompt all
of whose n samples are invalid has no pick: it is left out of the results and counted in the
report (`invalid_prompts`), not filled with a placeholder-scored response.

Only the rollout engines, the reward actor and, with `reward.judge`, the judge's engines start
(each role in its own placement group, all released however the run ends); no trainer.
`rayrlhf best-of-n` compares the mean reward of the picked responses with that of a single
sample per prompt, and with the demo prompts also reports the gold rule's score, which the
selection never sees.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from rayrlhf.algorithms.estimators import NO_PICK, best_of_n
from rayrlhf.algorithms.experience import assemble_rollout
from rayrlhf.cluster.actors import ActorSet
from rayrlhf.cluster.placement import start_ray, threads_for
from rayrlhf.config import ConfigError, TrainConfig, load_config
from rayrlhf.data.prompts import PromptSet
from rayrlhf.data.synthetic import gold_score
from rayrlhf.models.tokenizer import pad_id
from rayrlhf.runtime.preflight import context_limit, preflight
from rayrlhf.types import Sample
from rayrlhf.workers.judge import start_judges
from rayrlhf.workers.reward import RewardWorker
from rayrlhf.workers.rollout import RolloutEngine, generate_on


@dataclass(frozen=True)
class BestOfNResult:
    """The pick for one prompt."""

    prompt: str
    response: str
    """The highest-scoring of the n responses (the first one on ties)."""
    response_ids: tuple[int, ...]
    score: float
    """Reward of the picked response."""
    scores: tuple[float, ...]
    """Rewards of all n samples, in sampling order; NaN for an invalid one."""


def select_best(
    samples: list[Sample],
    prompts: list[str],
    scores: torch.Tensor,
    n: int,
    valid: torch.Tensor | None = None,
) -> list[BestOfNResult]:
    """Group rows [k*n, (k+1)*n) per prompt k and keep each group's best valid sample; a
    prompt with no valid sample is left out. scores, valid: [K*n] (valid None: all)."""
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid
    best = best_of_n(scores, n, valid).tolist()
    groups = torch.where(valid, scores, torch.nan).view(-1, n).tolist()
    return [
        BestOfNResult(
            prompts[k], samples[i].text, tuple(samples[i].response_ids), scores[i].item(),
            tuple(groups[k]),
        )
        for k, i in enumerate(best)
        if i != NO_PICK
    ]  # fmt: skip


def best_of_n_generate(
    actors: ActorSet,
    prompt_ids: list[list[int]],
    prompts: list[str],
    n: int,
    seed: int,
    pad_id: int,
    columns: list[dict] | None = None,
) -> list[BestOfNResult]:
    """Sample `n` responses per prompt, score them with the reward actor, keep the best valid
    one each (prompts with none are left out: `select_best`)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rows = [p for p in prompt_ids for _ in range(n)]
    texts = [t for t in prompts for _ in range(n)]
    parts = generate_on(actors.actors["rollout"], rows, seed, actors.get)
    samples = [s for part in parts for s in part.value]
    rollout = assemble_rollout(
        samples, texts, pad_id, None if columns is None else [c for c in columns for _ in range(n)]
    )
    (reward,) = actors.actors["reward"]
    out = actors.get(reward.score.remote(rollout), "reward").value
    return select_best(samples, prompts, out.scores, n, out.valid)


def _start(cfg: TrainConfig, actors: ActorSet) -> None:
    """The engines, the judge's engines if `reward.judge` is set (as PPO starts them) and the
    reward actor that calls them, each role in its own placement group of `actors`."""
    ro, rw = cfg.rollout, cfg.reward
    actors.start(
        "rollout", RolloutEngine, ro.resources, ro.num_engines,
        lambda i: (cfg.policy.model_path, ro, cfg.seed, i),
    )  # fmt: skip
    judges = start_judges(actors, rw.judge, cfg.seed) if rw.judge else None
    actors.start_one(
        "reward", RewardWorker, rw.resources, rw, threads_for(rw.resources), cfg.policy.model_path,
        judges,
    )  # fmt: skip
    actors.wait_ready()


def cpus_needed(cfg: TrainConfig) -> float:
    """Logical CPUs of the bundles `_start` reserves (what a local Ray is started with)."""
    ro, rw, judge = cfg.rollout, cfg.reward, cfg.reward.judge
    judges = judge.num_engines * judge.resources.num_cpus if judge else 0.0
    return ro.num_engines * ro.resources.num_cpus + rw.resources.num_cpus + judges


def _mean(values) -> float | None:
    """Mean of the finite values; None (JSON null) when there is none."""
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else None


def run_best_of_n(cfg: TrainConfig, n: int, num_prompts: int) -> dict:
    """Best-of-`n` vs one sample on the first `num_prompts` prompts of the configured set.

    Returns the JSON-ready report: mean reward of the picks (`mean_best_score`), of one sample
    per prompt (`mean_score_n1`, its own draw) and of all n valid samples
    (`mean_sample_score`), the prompts left without a pick because every sample's reward was
    invalid (`invalid_prompts`, `invalid_prompts_n1`), and with the demo prompts the gold
    rule's score of the picks and of the single samples. A mean over nothing is null.
    """
    preflight(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy.model_path)
    drawn = PromptSet.load(cfg.data, tokenizer, cfg.seed, context_limit(cfg)).draw(0, num_prompts)
    texts, ids = drawn.texts, drawn.ids
    start_ray(cfg.ray_address, cpus_needed(cfg))
    start = time.perf_counter()
    with ActorSet(cfg.phase_timeout_s, cfg.placement_timeout_s) as actors:
        _start(cfg, actors)
        pick = functools.partial(
            best_of_n_generate, actors, ids, texts, seed=cfg.seed * 1_000_003,
            pad_id=pad_id(tokenizer), columns=drawn.columns,
        )  # fmt: skip
        best, one = pick(n=n), pick(n=1)
    report = {
        "n": n,
        "prompts": len(texts),
        "mean_best_score": _mean(r.score for r in best),
        "mean_score_n1": _mean(r.score for r in one),
        "mean_sample_score": _mean(s for r in best for s in r.scores),
        "invalid_prompts": len(texts) - len(best),
        "invalid_prompts_n1": len(texts) - len(one),
    }
    if cfg.data.prompts == "demo":  # each pick with its own prompt: skipped ones shift the rest
        report["gold_best"] = _gold(best)
        report["gold_n1"] = _gold(one)
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def _gold(picks: list[BestOfNResult]) -> float | None:
    """The demo gold rule's mean score of the picks."""
    return _mean(gold_score([r.prompt for r in picks], [r.response for r in picks]))


def main(config: str | None, overrides: list[str], n: int, prompts: int) -> None:
    """`rayrlhf best-of-n`: prints the report as one JSON object."""
    if n < 1 or prompts < 1:
        raise ConfigError(f"--n and --prompts must be >= 1, got {n} and {prompts}")
    print(json.dumps(run_best_of_n(load_config(config, overrides), n, prompts)))
