"""The reward contract on the real stack: a PPO run (Ray + DeepSpeed + vLLM) on a parquet
prompt set whose rule reads each row's columns, combined with a reward model that has a
tokenizer of its own; a None score is a masked, counted sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ROWS = [
    {"prompt": "the good day", "answer": "12", "level": 1, "tags": ["a"]},
    {"prompt": "a bad night", "answer": "7", "level": 2, "tags": []},
    {"prompt": "the day is", "answer": "300", "level": 3, "tags": ["b", "c"]},
    {"prompt": "good and kind", "answer": "4", "level": 1, "tags": ["d"]},
]
PROBE = '''
import json, os

def record(prompts, responses, rows):
    """Writes what it saw; scores each sample, none for level 3 (an invalid sample)."""
    with open(os.environ["ROWS_PROBE_OUT"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "rows": rows}) + "\\n")
    return [None if row["level"] == 3 else {"score": 1.0, "answer_len": len(row["answer"])}
            for row in rows]
'''


@pytest.fixture(scope="module")
def qwen2_reward(tmp_path_factory):
    from rayrlhf.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("qwen2"), family="qwen2")["reward"]


def test_rule_reads_parquet_rows_beside_a_reward_model_with_its_own_tokenizer(
    tiny_models, qwen2_reward, tmp_path
):
    import datasets

    data = tmp_path / "prompts.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(data))
    (tmp_path / "rows_probe.py").write_text(PROBE)
    probe, run = tmp_path / "seen.jsonl", tmp_path / "run"
    cmd = [
        sys.executable, "-m", "rayrlhf.cli", "train", "--config", "configs/tiny-cpu.yaml",
        "--set", f"run_dir={run}", "--set", "make_tiny_models=null", "--set", "steps=2",
        "--set", f"policy.model_path={tiny_models['policy']}",
        "--set", "policy.micro_batch_size=4", "--set", "algorithm.advantage=grpo",
        "--set", "algorithm.n_samples_per_prompt=2", "--set", "algorithm.rollout_batch_size=8",
        "--set", "algorithm.num_mini_batches=1", "--set", "algorithm.ppo_epochs=1",
        "--set", f"reward.model_path={qwen2_reward}", "--set", "reward.model_weight=0.1",
        "--set", "reward.rule=rows_probe:record",
        "--set", f"data.prompts={data}", "--set", "data.chat_template=off",
        "--set", "eval.every_steps=2", "--set", f"eval.prompts={data}",
        "--set", "metrics.port=0", "--set", "metrics.plots=false", "--set", "save_final=false",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}", "ROWS_PROBE_OUT": str(probe)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "own tokenizer; responses are re-encoded" in out  # the qwen2 RM re-encodes text

    calls = [json.loads(line) for line in probe.read_text().splitlines()]
    assert len(calls) == 3  # two training steps, one evaluation
    expected = {r["prompt"]: {k: v for k, v in r.items() if k != "prompt"} for r in ROWS}
    for call in calls:
        assert [expected[p] for p in call["prompts"]] == call["rows"]  # exactly its columns
    train, evaluation = calls[:2], calls[2]
    assert all(len(c["rows"]) == 8 for c in train) and len(evaluation["rows"]) == 4

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "rollout/reward_mean" in r]
    assert len(steps) == 2
    for rec, call in zip(steps, train):
        invalid = sum(row["level"] == 3 for row in call["rows"])
        assert rec["reward/invalid"] == invalid
        valid = [len(row["answer"]) for row in call["rows"] if row["level"] != 3]
        assert rec["reward/answer_len"] == pytest.approx(sum(valid) / len(valid))
    last = steps[-1]
    assert last["eval/reward/invalid"] == 1.0  # the one level-3 held-out row
    assert last["eval/reward/answer_len"] == pytest.approx((2 + 1 + 1) / 3)
