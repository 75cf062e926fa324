"""A generative judge on the real stack: a 2-step GRPO run (Ray + DeepSpeed + vLLM) whose only
weighted reward term is `reward.judge`, a vLLM engine of its own in its own placement group.

The judge is the tiny policy with its output layer cut down to the digits and one letter, so
that its greedy verdict starts with a digit (a score) for some responses and with the letter (no
score) for others. A weight-0 rule records every (prompt, response) the reward actor saw; the test
re-generates each verdict with HF `generate` under the same template and parser, and the run's
logged reward/invalid, reward/judge_unparsed, reward/judge_score and rollout/reward_mean must
equal what those verdicts give."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = "Judge: {prompt} | {response}"  # ends on the response: verdicts vary with it
PATTERN = r"^\s*(\d)"
NEW_TOKENS = 2
PROBE = '''
import json, os

def record(prompts, responses, rows):
    """Writes what the reward actor scored; a valid 0 for each sample (weight 0 anyway)."""
    with open(os.environ["JUDGE_PROBE_OUT"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "responses": responses}) + "\\n")
    return [0.0] * len(prompts)
'''


def digit_judge(policy: Path, out: Path) -> Path:
    """The tiny policy whose lm_head keeps only the rows of 0-9 and of 'h': every greedy token
    is a digit or 'h', depending on the context (about half digits on the demo prompts)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy)
    vocab = tok.get_vocab()
    keep = [vocab[c] for c in "0123456789h"]
    with torch.no_grad():
        weight = model.lm_head.weight
        kept = weight[keep].clone() * 4
        weight.zero_()
        weight[keep] = kept
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def expected_verdicts(judge: Path, call: dict) -> list[float | None]:
    """Each sample's score as the judge gives it: HF greedy under the run's template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(judge)
    model = AutoModelForCausalLM.from_pretrained(judge)
    scores = []
    for prompt, response in zip(call["prompts"], call["responses"]):
        text = TEMPLATE.format(prompt=prompt, response=response)
        ids = torch.tensor([tok(text, add_special_tokens=True)["input_ids"]])
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        verdict = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        match = re.search(PATTERN, verdict, re.IGNORECASE)
        scores.append(float(match.group(1)) if match else None)
    return scores


def test_judge_scores_are_the_judges_greedy_verdicts(tiny_models, tmp_path):
    judge = digit_judge(tiny_models["policy"], tmp_path / "judge")
    (tmp_path / "judge_probe.py").write_text(PROBE)
    probe, run = tmp_path / "seen.jsonl", tmp_path / "run"
    sets = [
        f"run_dir={run}", "make_tiny_models=null", "steps=2",
        f"policy.model_path={tiny_models['policy']}", "policy.num_ranks=1",
        "policy.micro_batch_size=4", "algorithm.advantage=grpo",
        "algorithm.n_samples_per_prompt=2", "algorithm.rollout_batch_size=8",
        "algorithm.num_mini_batches=1", "algorithm.ppo_epochs=1",
        "reward.model_path=null", "reward.rules=[{fn: 'judge_probe:record', weight: 0.0}]",
        f"reward.judge.model_path={judge}", f"reward.judge.template='{TEMPLATE}'",
        f"reward.judge.score_pattern='{PATTERN}'", f"reward.judge.max_new_tokens={NEW_TOKENS}",
        "reward.judge.min_score=0", "reward.judge.max_score=9", "reward.judge.dtype=float32",
        "metrics.prometheus=false", "metrics.plots=false", "metrics.tensorboard=false",
        "save_final=false",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "rayrlhf.cli", "train", "--config", "configs/tiny-cpu.yaml"]
    cmd += [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}", "JUDGE_PROBE_OUT": str(probe)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    calls = [json.loads(line) for line in probe.read_text().splitlines()]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "rollout/reward_mean" in r]
    assert len(calls) == len(steps) == 2
    parsed = unparsed = 0
    for rec, call in zip(steps, calls):
        scores = expected_verdicts(judge, call)
        valid = [s for s in scores if s is not None]
        parsed, unparsed = parsed + len(valid), unparsed + len(scores) - len(valid)
        assert rec["reward/invalid"] == len(scores) - len(valid), (rec, scores)
        assert rec["reward/judge_unparsed"] == pytest.approx(1 - len(valid) / len(scores))
        if valid:
            assert rec["reward/judge_score"] == pytest.approx(sum(valid) / len(valid))
            # The reward: weight 1 x (score - 0) / (9 - 0), averaged over the valid samples.
            assert rec["rollout/reward_mean"] == pytest.approx(sum(valid) / 9 / len(valid))
        else:
            assert math.isnan(rec["reward/judge_score"])
    assert parsed and unparsed, "the judge must give both scores and unparsed verdicts here"
