"""Evaluation during PPO, on fake roles: when it runs, what it asks the roles, what it logs, and
which prompts it holds (checked before Ray starts)."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
from transformers import AutoTokenizer

from rayrlhf.config import ConfigError, load_config
from rayrlhf.data.jsonl import DataError
from rayrlhf.data.prompts import PromptSet
from rayrlhf.runtime.evaluation import Evaluator, eval_record, load_eval_prompts
from rayrlhf.types import RewardOutput, Sample


@pytest.fixture(scope="module")
def tok(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    tok.chat_template = None  # the raw-text path; the template's rules are tests/data's
    return tok


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's relative run_dir (eval_samples.jsonl) lands here


def _cfg(*overrides):
    return load_config(None, ["make_tiny_models=null", *overrides])


class FakeRoles:
    """Answers prompt i with i % 3 + 1 tokens; the reward of row i is i."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[list[int]], int, bool]] = []

    def generate(self, prompt_ids, seed, greedy=False, timer=None):
        self.calls.append((prompt_ids, seed, greedy))
        n = [i % 3 + 1 for i in range(len(prompt_ids))]
        return [Sample(list(p), [7] * k, [0.0] * k, "x" * k) for p, k in zip(prompt_ids, n)]

    def rewards(self, rollout):
        n = len(rollout)
        return RewardOutput(
            torch.arange(n, dtype=torch.float32), torch.ones(n, dtype=torch.bool), {}
        )


def test_off_by_default_loads_nothing_and_is_never_due(tok):
    ev = Evaluator(_cfg(), tok, pad_id=0)
    assert ev.prompts is None
    assert not any(ev.due(s) for s in range(100))
    assert ev(FakeRoles(), 9) == {}


def test_runs_after_every_nth_step_on_the_same_prompts(tok):
    ev = Evaluator(_cfg("eval.every_steps=3", "eval.num_prompts=6"), tok, pad_id=0)
    roles = FakeRoles()
    recs = {step: ev(roles, step) for step in range(9)}
    assert [s for s, r in recs.items() if r] == [2, 5, 8]
    assert len(roles.calls) == 3
    assert roles.calls[0][0] == roles.calls[1][0] == roles.calls[2][0]  # a fixed set
    assert all(greedy for _, _, greedy in roles.calls)
    rec = recs[2]
    assert rec["eval/reward_mean"] == pytest.approx(2.5)  # mean of 0..5
    assert rec["eval/response_length"] == pytest.approx(2.0)  # 1, 2, 3, 1, 2, 3
    assert rec["eval/num_prompts"] == 6 and rec["eval/seconds"] >= 0
    assert "eval/accuracy" not in rec


def test_sampled_evaluation_is_seeded_by_the_step(tok):
    ev = Evaluator(_cfg("eval.every_steps=1", "eval.num_prompts=2", "eval.greedy=false"), tok, 0)
    roles = FakeRoles()
    for step in (0, 1):
        ev(roles, step)
    (_, s0, g0), (_, s1, g1) = roles.calls
    assert not g0 and not g1 and s0 != s1


def test_accuracy_is_logged_when_the_reward_reports_it():
    samples = [Sample([1], [2, 3], [0.0, 0.0], "ab")] * 4
    rec = eval_record(torch.tensor([1.0, 0.0, 1.0, 1.0]), samples, torch.tensor([1, 0, 1, 1]))
    assert rec["eval/accuracy"] == 0.75 and rec["eval/response_length"] == 2.0


def test_demo_eval_prompts_are_drawn_with_another_seed(tok):
    cfg = _cfg("eval.every_steps=1", "eval.num_prompts=16")
    held_out = load_eval_prompts(cfg, tok)
    train = PromptSet.load(cfg.data, tok, cfg.seed)
    assert len(held_out) == 16
    assert held_out.texts != train.texts[:16]


def test_file_eval_prompts_are_the_first_n_read_with_data_settings(tok, tmp_path):
    path = tmp_path / "held_out.jsonl"
    rows = [{"q": f"Describe the {t}:", "answer": t} for t in ("sea", "rain", "park")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(f"eval.prompts={path}", "eval.num_prompts=2", "data.prompt_key=q")
    held_out = load_eval_prompts(cfg, tok)
    assert held_out.texts == ["Describe the sea:", "Describe the rain:"]
    assert held_out.columns == [{"answer": "sea"}, {"answer": "rain"}]
    assert len(load_eval_prompts(_cfg(f"eval.prompts={path}", "data.prompt_key=q"), tok)) == 3


def test_a_missing_eval_file_names_the_field(tok, tmp_path):
    with pytest.raises(ConfigError, match="eval.prompts: path does not exist"):
        Evaluator(_cfg("eval.every_steps=5", f"eval.prompts={tmp_path / 'nope.jsonl'}"), tok, 0)


def test_a_bad_eval_row_names_file_and_line_when_the_run_is_built(tok, tmp_path):
    path = tmp_path / "held_out.jsonl"
    path.write_text('{"prompt": "Describe the sea:"}\n{"prompt": ""}\n')
    with pytest.raises(DataError, match=rf"{path}:2: 'prompt' is empty"):
        Evaluator(_cfg("eval.every_steps=5", f"eval.prompts={path}"), tok, 0)


def test_at_start_writes_the_starting_policy_as_step_minus_one(tok, capsys):
    ev = Evaluator(_cfg("eval.at_start=true", "eval.num_prompts=3"), tok, pad_id=0)
    roles, written = FakeRoles(), []
    rec = ev.at_start(roles, written.append)
    assert written == [rec] and rec["step"] == -1  # plotted at 0 steps done
    assert rec["eval/reward_mean"] == pytest.approx(1.0) and rec["eval/num_prompts"] == 3
    assert "eval before PPO | reward +1.000" in capsys.readouterr().out
    assert not any(ev.due(s) for s in range(50))  # every_steps 0: the only evaluation
    off = Evaluator(_cfg("eval.every_steps=2"), tok, pad_id=0)
    assert off.at_start(roles, written.append) == {} and len(written) == 1


def _gold(prompts, responses, rows):
    """Scores len/10 with an extra `long`; sample 0 unscored (None)."""
    _gold.seen = (list(prompts), list(responses), list(rows))
    out = [{"score": len(r) / 10, "long": float(len(r) >= 2)} for r in responses]
    return [None, *out[1:]]


def test_gold_scores_the_same_eval_responses_beside_the_proxy(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "gold_fixture", types.SimpleNamespace(gold=_gold))
    ev = Evaluator(
        _cfg("eval.every_steps=1", "eval.num_prompts=6", "eval.gold=gold_fixture:gold"), tok, 0
    )
    rec = ev(FakeRoles(), 0)
    prompts, responses, rows = _gold.seen
    assert prompts == ev.prompts.texts and rows == [{}] * 6  # the eval set, with its columns
    assert responses == ["x", "xx", "xxx", "x", "xx", "xxx"]  # the proxy's responses
    assert rec["eval/reward_mean"] == pytest.approx(2.5)  # the proxy, untouched by the gold
    assert rec["eval/gold"] == pytest.approx((2 + 3 + 1 + 2 + 3) / 50)  # sample 0 left out
    assert rec["eval/gold/long"] == pytest.approx(4 / 5)
    assert rec["eval/gold/invalid"] == 1
    lines = [json.loads(x) for x in open("runs/tiny-ppo/eval_samples.jsonl")]
    assert [r["response"] for r in lines] == responses and lines[0]["gold"] is None
    assert [r["step"] for r in lines] == [1] * 6 and lines[2]["gold"] == pytest.approx(0.3)
    assert lines[5]["reward"] == 5.0


def test_a_gold_spec_that_does_not_load_fails_when_the_run_is_built(tok):
    with pytest.raises(RuntimeError, match="reward function 'no_such_module:fn'"):
        Evaluator(_cfg("eval.every_steps=1", "eval.gold=no_such_module:fn"), tok, 0)


def test_without_gold_no_gold_keys_are_logged(tok):
    rec = Evaluator(_cfg("eval.every_steps=1", "eval.num_prompts=2"), tok, 0)(FakeRoles(), 0)
    assert not any(k.startswith("eval/gold") for k in rec)
    assert math.isfinite(rec["eval/reward_mean"])


class InvalidRoles(FakeRoles):
    """FakeRoles whose reward is invalid (None/NaN from the function: placeholder 0) on the
    rows `invalid` says."""

    def __init__(self, invalid) -> None:
        super().__init__()
        self.invalid = invalid

    def rewards(self, rollout):
        n = len(rollout)
        valid = torch.tensor([not self.invalid(i) for i in range(n)])
        scores = torch.where(valid, torch.arange(n, dtype=torch.float32) + 1, 0.0)
        return RewardOutput(scores, valid, {})


def test_eval_reward_statistics_are_over_the_valid_samples(tok):
    ev = Evaluator(_cfg("eval.every_steps=1", "eval.num_prompts=4"), tok, 0)
    rec = ev(InvalidRoles(lambda i: i % 2 == 1), 0)  # rows 0 and 2 valid: rewards 1 and 3
    assert rec["eval/reward_mean"] == pytest.approx(2.0)
    assert rec["eval/reward_std"] == pytest.approx(1.0)
    assert rec["eval/reward/invalid"] == 2.0


def test_an_eval_with_no_valid_sample_logs_nan_without_warnings(tok, recwarn):
    ev = Evaluator(_cfg("eval.every_steps=1", "eval.num_prompts=3"), tok, 0)
    rec = ev(InvalidRoles(lambda i: True), 0)
    assert math.isnan(rec["eval/reward_mean"]) and math.isnan(rec["eval/reward_std"])
    assert rec["eval/reward/invalid"] == 3.0 and rec["eval/num_prompts"] == 3
    assert not [w for w in recwarn if "std()" in str(w.message)]
