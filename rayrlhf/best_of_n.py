"""Best-of-N sampling: n responses per prompt from the vLLM engines, the reward actor picks one.

Only the rollout engines and the reward actor start (each role in its own placement group); no
trainer. `rayrlhf best-of-n` compares the mean reward of the picked responses with that of a
single sample per prompt, and with the demo prompts also reports the gold rule's score, which
the selection never sees.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import dataclass

import ray
import torch
from ray.util.placement_group import remove_placement_group
from transformers import AutoTokenizer

from rayrlhf.algorithms.estimators import best_of_n
from rayrlhf.cluster.placement import actor_options, reserve, threads_for
from rayrlhf.config import ConfigError, TrainConfig, load_config
from rayrlhf.data.prompts import DataError, PromptSet
from rayrlhf.data.synthetic import gold_score
from rayrlhf.experience import assemble_rollout
from rayrlhf.preflight import preflight
from rayrlhf.workers.reward import RewardWorker
from rayrlhf.workers.rollout import RolloutEngine, Sample


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
    """Rewards of all n samples, in sampling order."""


def _generate(
    engines: list, prompt_ids: list[list[int]], seed: int, timeout: float
) -> list[Sample]:
    """Split the rows evenly over the engines; row i samples with seed + i on any engine."""
    m = len(engines)
    bounds = [len(prompt_ids) * i // m for i in range(m + 1)]
    calls = [
        e.generate.remote(prompt_ids[a:b], seed + a)
        for e, a, b in zip(engines, bounds, bounds[1:])
        if b > a
    ]
    return [s for part in ray.get(calls, timeout=timeout) for s in part.value]


def select_best(
    samples: list[Sample], prompts: list[str], scores: torch.Tensor, n: int
) -> list[BestOfNResult]:
    """Group rows [k*n, (k+1)*n) per prompt k and keep each group's best. scores: [K*n]."""
    best = best_of_n(scores, n).tolist()
    groups = scores.view(-1, n).tolist()
    return [
        BestOfNResult(
            prompts[k], samples[i].text, tuple(samples[i].response_ids), scores[i].item(),
            tuple(groups[k]),
        )
        for k, i in enumerate(best)
    ]  # fmt: skip


def best_of_n_generate(
    engines: list,
    reward,
    prompt_ids: list[list[int]],
    prompts: list[str],
    n: int,
    seed: int,
    pad_id: int,
    timeout: float = 900.0,
) -> list[BestOfNResult]:
    """Sample `n` responses per prompt, score them with the reward actor, keep the best each."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rows = [p for p in prompt_ids for _ in range(n)]
    texts = [t for t in prompts for _ in range(n)]
    samples = _generate(engines, rows, seed, timeout)
    rollout = assemble_rollout(samples, texts, pad_id)
    scores = ray.get(reward.score.remote(rollout), timeout=timeout).value
    return select_best(samples, prompts, scores, n)


def _start(cfg: TrainConfig) -> tuple[list, object, list]:
    """The engines and the reward actor, each role in its own placement group."""
    ro, rw, pgs = cfg.rollout, cfg.reward, []
    pgs.append(reserve("rollout", ro.resources, ro.num_engines, cfg.placement_timeout_s))
    engines = [
        ray.remote(RolloutEngine)
        .options(**actor_options(pgs[0], i, ro.resources))
        .remote(cfg.policy.model_path, ro, cfg.seed, i)
        for i in range(ro.num_engines)
    ]
    pgs.append(reserve("reward", rw.resources, 1, cfg.placement_timeout_s))
    reward = (
        ray.remote(RewardWorker)
        .options(**actor_options(pgs[1], 0, rw.resources))
        .remote(rw.model_path, rw.rule, rw.micro_batch_size, threads_for(rw.resources))
    )
    ray.get([a.__ray_ready__.remote() for a in [*engines, reward]], timeout=cfg.phase_timeout_s)
    return engines, reward, pgs


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)


def run_best_of_n(cfg: TrainConfig, n: int, num_prompts: int) -> dict:
    """Best-of-`n` vs one sample on the first `num_prompts` prompts of the configured set.

    Returns the JSON-ready report: mean reward of the picks (`mean_best_score`), of one sample
    per prompt (`mean_score_n1`, its own draw) and of all n samples (`mean_sample_score`), and
    with the demo prompts the gold rule's score of the picks and of the single samples.
    """
    from rayrlhf.trainer import connect

    preflight(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy.model_path)
    texts, ids = PromptSet.load(cfg.data, tokenizer, cfg.seed).batch(0, num_prompts)
    connect(cfg)
    start = time.perf_counter()
    engines, reward, pgs = _start(cfg)
    try:
        pick = functools.partial(
            best_of_n_generate, engines, reward, ids, texts, seed=cfg.seed * 1_000_003,
            pad_id=tokenizer.pad_token_id, timeout=cfg.phase_timeout_s,
        )  # fmt: skip
        best, one = pick(n=n), pick(n=1)
    finally:
        for actor in [*engines, reward]:
            ray.kill(actor)
        for pg in pgs:
            remove_placement_group(pg)
    report = {
        "n": n,
        "prompts": len(texts),
        "mean_best_score": _mean(r.score for r in best),
        "mean_score_n1": _mean(r.score for r in one),
        "mean_sample_score": _mean(s for r in best for s in r.scores),
    }
    if cfg.data.prompts == "demo":
        report["gold_best"] = _mean(gold_score(texts, [r.response for r in best]))
        report["gold_n1"] = _mean(gold_score(texts, [r.response for r in one]))
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def best_of_n_main(config: str | None, overrides: list[str], n: int, num_prompts: int) -> int:
    """`rayrlhf best-of-n`: prints the report as JSON; 2 on bad input found before Ray starts."""
    try:
        if n < 1 or num_prompts < 1:
            raise ConfigError(f"--n and --prompts must be >= 1, got {n} and {num_prompts}")
        report = run_best_of_n(load_config(config, overrides), n, num_prompts)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"rayrlhf: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0
