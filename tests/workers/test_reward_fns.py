"""The reward contract on its own: loading, sync/async/legacy calls, normalisation of floats and
dicts, errors that name the function, and the weighted combination with validity."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from rayrlhf.workers.reward_fns import (
    RewardFn,
    RewardFnError,
    combine,
    load_reward_fn,
    normalise,
    score_terms,
)

PROMPTS, RESPONSES = ["1+1=", "2+2=", "3+3="], ["2", "5", "6"]
ROWS = [{"answer": "2"}, {"answer": "4"}, {"answer": "6", "level": 3}]


def exact(prompts, responses, rows):
    return [{"score": float(r == row["answer"]), "accuracy": float(r == row["answer"])}
            for r, row in zip(responses, rows)]  # fmt: skip


async def exact_async(prompts, responses, rows):
    return [float(r == row["answer"]) for r, row in zip(responses, rows)]


def legacy(prompts, responses):
    return [len(r) for r in responses]  # ints are numbers too


class Scorer:
    """A callable object (as the remote client is)."""

    def __init__(self) -> None:
        self.seen: list[list[dict]] = []

    async def __call__(self, prompts, responses, rows):
        self.seen.append(rows)
        return [0.5] * len(prompts)


@pytest.fixture
def user_module(monkeypatch):
    mod = types.ModuleType("user_rewards")
    mod.exact, mod.legacy, mod.not_callable = exact, legacy, 3
    monkeypatch.setitem(sys.modules, "user_rewards", mod)
    return mod


def test_load_and_call_sync_async_legacy_and_objects(user_module):
    out = load_reward_fn("user_rewards:exact")(PROMPTS, RESPONSES, ROWS)
    assert out.scores.tolist() == [1.0, 0.0, 1.0]
    assert out.extras["accuracy"].tolist() == [1.0, 0.0, 1.0]
    assert RewardFn("a", exact_async)(PROMPTS, RESPONSES, ROWS).scores.tolist() == [1.0, 0.0, 1.0]
    leg = load_reward_fn("user_rewards:legacy")
    assert not leg.takes_rows
    assert leg(PROMPTS, RESPONSES, ROWS).scores.tolist() == [1.0, 1.0, 1.0]
    obj = Scorer()
    assert RewardFn("http://x/score", obj)(PROMPTS, RESPONSES, ROWS).scores.tolist() == [0.5] * 3
    assert obj.seen == [ROWS]  # rows passed unchanged


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("user_rewards:nope", "cannot be loaded"),
        ("no_such_module_xyz:f", "cannot be loaded"),
        ("user_rewards:not_callable", "not callable"),
        ("no_colon", "module:function"),
    ],
)
def test_load_errors_name_the_spec(user_module, spec, match):
    with pytest.raises(RewardFnError, match=rf"reward function '{spec}'.*{match}"):
        load_reward_fn(spec)


def test_a_function_that_raises_is_named_not_a_deep_traceback():
    def broken(prompts, responses, rows):
        return [1 / 0 for _ in prompts]

    with pytest.raises(RewardFnError, match=r"reward function 'm:broken' raised ZeroDivision"):
        RewardFn("m:broken", broken)(PROMPTS, RESPONSES, ROWS)


@pytest.mark.parametrize(
    ("out", "match"),
    [
        ([1.0, 2.0], "returned 2 values for 3 samples"),
        (1.0, "returned float"),
        ({"score": 1.0}, "returned dict"),
        ([1.0, "0.5", 1.0], "sample 1's score is str"),
        ([1.0, {"accuracy": 1.0}, 1.0], "sample 1 is a dict without 'score'"),
        ([1.0, {"score": 1.0, "acc": [1]}, 1.0], "sample 1's acc is list"),
    ],
)
def test_off_contract_results_are_errors_naming_the_function(out, match):
    with pytest.raises(RewardFnError, match=rf"^reward function 'm:f'.*{match}"):
        normalise("m:f", out, 3)


def test_none_nan_inf_are_invalid_samples_and_missing_extras_are_nan():
    out = normalise("m:f", [None, math.nan, {"score": math.inf, "x": 1.0}, 2, True], 5)
    assert out.scores[:3].isnan().all() and out.scores[3:].tolist() == [2.0, 1.0]
    x = out.extras["x"]
    assert x[2].item() == 1.0 and x[[0, 1, 3, 4]].isnan().all()


def test_combine_weights_terms_and_masks_invalid_samples():
    a = normalise("a", [{"score": 1.0, "accuracy": 1.0}, 2.0, None], 3)
    b = normalise("b", [0.5, 0.5, 0.5], 3)
    out = combine([("a", 2.0, a), ("b", -1.0, b)])
    assert out.scores.tolist() == [1.5, 3.5, 0.0]  # 0 on the invalid sample
    assert out.valid.tolist() == [True, True, False]
    summary = out.summary()
    assert summary["invalid"] == 1.0
    assert summary["accuracy"] == 1.0  # the mean over valid samples that report it
    with pytest.raises(RewardFnError, match=r"'b' reports extra 'accuracy', as 'a' does"):
        combine([("a", 1.0, a), ("b", 1.0, a)])


def test_all_invalid_summary_is_a_count_and_nan_extras():
    out = combine([("a", 1.0, normalise("a", [{"score": None, "acc": 1.0}] * 2, 2))])
    summary = out.summary()
    assert summary["invalid"] == 2.0 and math.isnan(summary["acc"])
    assert out.scores.tolist() == [0.0, 0.0] and not out.valid.any()


def test_async_terms_run_concurrently():
    import asyncio
    import time

    async def slow(prompts, responses, rows):
        await asyncio.sleep(0.3)
        return [1.0] * len(prompts)

    fns = [RewardFn(f"m:slow{i}", slow) for i in range(4)]
    start = time.perf_counter()
    outs = asyncio.run(score_terms(fns, PROMPTS, RESPONSES, ROWS))
    assert time.perf_counter() - start < 0.9  # 4 x 0.3 s one after another would be 1.2 s
    assert all(torch.equal(o.scores, torch.ones(3)) for o in outs)
