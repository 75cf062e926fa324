"""The generative judge's pure parts, in-process: the score parser, scaling, the rendered judge
prompt, the term it gives the reward (a verdict that does not parse is an invalid sample, and
counted), and the reward actor combining it with other terms (engines faked; the real ones run in
tests/e2e/test_judge_run.py)."""

from __future__ import annotations

import math
import re
import sys
import types

import pytest
from transformers import AutoTokenizer

from rayrlhf.config import JudgeConfig, RewardConfig
from rayrlhf.config.rewards import DEFAULT_SCORE_PATTERN
from rayrlhf.types import Timed
from rayrlhf.workers import judge as judge_module
from rayrlhf.workers.judge import (
    Verdict,
    judge_calls,
    judge_term,
    parse_score,
    render,
    scale,
)
from rayrlhf.workers.reward import RewardWorker

DEFAULT = re.compile(DEFAULT_SCORE_PATTERN, re.IGNORECASE)


@pytest.mark.parametrize(
    "text, score",
    [
        ("Score: 7", 7.0),
        ("score=8.5", 8.5),
        ("RATING 3", 3.0),
        ("rating: -2", -2.0),
        ("The score is high. Score: 4\nFinal score: 9", 9.0),  # the last match counts
        ("Score:10/10", 10.0),
        ("I'd give it a 7", None),  # no keyword
        ("Score: seven", None),
        ("", None),
    ],
)
def test_default_parser(text, score):
    assert parse_score(DEFAULT, text) == score


def test_parser_refuses_non_numbers_and_non_finite_groups():
    anything = re.compile(r"verdict: (\S+)", re.IGNORECASE)
    assert parse_score(anything, "Verdict: 2e1") == 20.0
    assert parse_score(anything, "verdict: good") is None
    assert parse_score(anything, "verdict: inf") is None
    assert parse_score(anything, "verdict: nan") is None
    optional = re.compile(r"x(\d)?")  # a group that did not take part in the match
    assert parse_score(optional, "x") is None


def test_scale_maps_the_template_scale_to_unit_interval_and_clips():
    cfg = JudgeConfig(model_path="j", min_score=1, max_score=10)
    assert [scale(cfg, s) for s in (1, 5.5, 10, 0, 12)] == [0.0, 0.5, 1.0, 0.0, 1.0]
    raw = JudgeConfig(model_path="j", min_score=None, max_score=None)
    assert scale(raw, 12.5) == 12.5


def test_render_fills_the_template_with_the_judge_tokenizer(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    cfg = JudgeConfig(model_path="j", template="Q {prompt} A {response} {{braces}}")
    ids = render(cfg, tok, "the day", "is good")
    assert ids == tok("Q the day A is good {braces}", add_special_tokens=True)["input_ids"]
    templated = render(cfg.model_copy(update={"chat_template": True}), tok, "the day", "is good")
    turn = [{"role": "user", "content": "Q the day A is good {braces}"}]
    text = tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    assert templated == tok(text, add_special_tokens=False)["input_ids"]


def _parts(*groups: list[str]) -> list[Timed]:
    """Engines' replies: each a Timed list of verdicts parsed with the default pattern."""
    return [Timed([Verdict(t, parse_score(DEFAULT, t)) for t in g], 0.0) for g in groups]


def test_judge_term_scores_extras_and_unparsed():
    cfg = JudgeConfig(model_path="j", min_score=0, max_score=10)
    term = judge_term(cfg, _parts(["Score: 5", "no idea"], ["rating=10", "Score: x"]))
    assert term.scores[0].item() == 0.5 and term.scores[2].item() == 1.0
    assert math.isnan(term.scores[1].item()) and math.isnan(term.scores[3].item())
    assert term.extras["judge_score"][[0, 2]].tolist() == [5.0, 10.0]
    assert term.extras["judge_unparsed"].tolist() == [0.5] * 4  # the batch's rate on each row


def test_judge_calls_split_the_batch_in_order():
    seen = []

    class Engine:
        def __init__(self, name):
            self.judge = types.SimpleNamespace(remote=lambda p, r: seen.append((name, p, r)))

    judge_calls([Engine(0), Engine(1), Engine(2)], list("abcde"), list("ABCDE"))
    assert seen == [(0, ["a"], ["A"]), (1, ["b", "c"], ["B", "C"]), (2, ["d", "e"], ["D", "E"])]
    seen.clear()
    judge_calls([Engine(0), Engine(1)], ["a"], ["A"])  # an engine with no rows gets no call
    assert seen == [(1, ["a"], ["A"])]
    assert judge_calls([], ["a"], ["A"]) == []  # no judge configured


class FakeEngine:
    """A judge engine whose verdict is a fixed function of the response."""

    def __init__(self, verdicts: dict[str, str]):
        def remote(prompts, responses):
            return _parts([verdicts[r] for r in responses])[0]

        self.judge = types.SimpleNamespace(remote=remote)


def test_reward_worker_adds_the_judge_term_and_masks_unparsed(monkeypatch):
    mod = types.ModuleType("judge_rule")
    mod.rule = lambda prompts, responses, rows: [{"score": 1.0, "n": len(r)} for r in responses]
    monkeypatch.setitem(sys.modules, "judge_rule", mod)
    monkeypatch.setattr(judge_module.ray, "get", lambda refs: refs)  # the fakes answer at once
    judge = JudgeConfig(model_path="j", weight=2.0, min_score=0, max_score=10)
    cfg = RewardConfig(rules=[{"fn": "judge_rule:rule", "weight": 0.5}], judge=judge)
    engines = [FakeEngine({"good": "Score: 10", "bad": "Score: 2", "odd": "??"})] * 2
    worker = RewardWorker(cfg, 1, None, engines)
    responses = ["good", "odd", "bad", "good"]
    rollout = types.SimpleNamespace(prompts=["p"] * 4, responses=responses, rows=[{}] * 4)
    out = worker.score.__wrapped__(worker, rollout)  # unwrap @timed and no_grad
    assert out.valid.tolist() == [True, False, True, True]
    assert out.scores.tolist() == pytest.approx([2.5, 0.0, 0.9, 2.5])  # 0.5 x 1 + 2 x scaled
    summary = out.summary()
    assert summary["invalid"] == 1.0 and summary["judge_unparsed"] == 0.25
    assert summary["judge_score"] == pytest.approx(22 / 3)


def test_reward_worker_refuses_a_judge_without_engines():
    cfg = RewardConfig(judge=JudgeConfig(model_path="j"))
    with pytest.raises(ValueError, match="reward.judge"):
        RewardWorker(cfg, 1)
