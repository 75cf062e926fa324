"""SFT and reward-model training on the real stack (Ray, DeepSpeed ZeRO-3 on gloo), tiny models.

RM: 500 synthetic pairs from the tiny policy's backbone with a fresh head, 2 epochs; held-out
pairwise accuracy must reach 0.9 (measured: 0.29 before training, 1.0 after epoch 1), and the
saved model must score through the PPO reward role unchanged.
SFT: 500 synthetic demonstrations, 2 epochs; loss falls (measured 6.23 -> 2.05) and greedy
samples use kind words far more often (measured gold score 0.03 -> 0.24).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoTokenizer

from rayrlhf.cli import main
from rayrlhf.config import RewardConfig
from rayrlhf.data.demo_task import demo_prompts
from rayrlhf.data.reward_pairs import load_reward_pairs
from rayrlhf.runtime.gold_eval import greedy_gold_score
from rayrlhf.types import Rollout
from rayrlhf.workers.reward import RewardWorker

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _rollout(seqs: torch.Tensor, attn: torch.Tensor) -> Rollout:
    n = len(seqs)
    return Rollout(seqs, attn, torch.ones(n, 1), torch.zeros(n, 1), ("",) * n, ("",) * n, ({},) * n)


def test_reward_model_learns_held_out_preferences(local_ray, tiny_models, tmp_path):
    run = tmp_path / "rm"
    argv = ["rm", "--config", str(ROOT / "configs/rm-tiny-cpu.yaml")]
    for o in (f"run_dir={run}", f"model_path={tiny_models['policy']}", "make_tiny_models=null"):
        argv += ["--set", o]
    assert main(argv) == 0

    records = _records(run)
    evals = [r for r in records if "eval/accuracy" in r]
    steps = [r for r in records if "rm/loss" in r]
    assert len(evals) == 3 and len(steps) == 2 * (500 // 32)
    assert evals[0]["eval/accuracy"] < 0.75  # the fresh head really starts near chance
    assert evals[-1]["eval/accuracy"] >= 0.9
    assert evals[-1]["train/accuracy"] >= 0.9
    assert steps[-1]["rm/loss"] < steps[0]["rm/loss"] / 2

    # The PPO reward role loads the saved model unchanged and ranks held-out pairs the same way.
    worker = RewardWorker(RewardConfig(model_path=str(run / "model"), micro_batch_size=50), 1)
    tok = AutoTokenizer.from_pretrained(run / "model")
    pairs = load_reward_pairs(run / "data/eval.jsonl", tok, 64)
    batch = pairs.batch(list(range(len(pairs))))
    chosen = worker.score(_rollout(batch.chosen_sequences, batch.chosen_attention_mask)).value
    rejected = worker.score(_rollout(batch.rejected_sequences, batch.rejected_attention_mask))
    assert len(pairs) == 100
    assert (chosen.scores > rejected.value.scores).float().mean().item() >= 0.9


def test_sft_learns_the_demonstration_format(local_ray, tiny_models, tmp_path):
    run = tmp_path / "sft"
    argv = ["sft", "--config", str(ROOT / "configs/sft-tiny-cpu.yaml")]
    for o in (f"run_dir={run}", f"model_path={tiny_models['policy']}", "make_tiny_models=null"):
        argv += ["--set", o]
    assert main(argv) == 0

    records = _records(run)
    steps = [r["sft/loss"] for r in records if "sft/loss" in r]
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert len(steps) == 2 * (500 // 32) and len(evals) == 3
    assert steps[-1] < 0.6 * steps[0] and evals[-1] < 0.6 * evals[0]

    prompts = demo_prompts(64, seed=12345)
    before, _ = greedy_gold_score(tiny_models["policy"], prompts)
    after, samples = greedy_gold_score(run / "model", prompts)
    assert after > before + 0.1, (before, after, samples[:4])
