"""Best-of-N selection on engine samples (the actors are exercised in tests/e2e/)."""

import json
import math

import torch

from rayrlhf.recipes.best_of_n import _mean, select_best
from rayrlhf.types import Sample


def test_select_best_keeps_each_prompts_highest_scoring_sample():
    samples = [Sample([1], [10 + i], [0.0], f"r{i}") for i in range(6)]
    scores = torch.tensor([0.1, 0.9, 0.3, 0.5, 0.5, 0.2])  # 2 prompts x 3 samples; a tie in #2
    out = select_best(samples, ["p0", "p1"], scores, n=3)
    assert [(r.prompt, r.response, r.response_ids) for r in out] == [
        ("p0", "r1", (11,)),
        ("p1", "r3", (13,)),  # the first of equal scores
    ]
    assert out[0].score == torch.tensor(0.9).item()
    assert out[1].scores == tuple(torch.tensor([0.5, 0.5, 0.2]).tolist())


def test_select_best_with_one_sample_is_the_identity():
    samples = [Sample([1], [2], [0.0], "a"), Sample([1], [3], [0.0], "b")]
    out = select_best(samples, ["p", "q"], torch.tensor([0.4, -1.0]), n=1)
    assert [r.response for r in out] == ["a", "b"]


def test_select_best_never_picks_an_invalid_sample_and_skips_all_invalid_prompts():
    samples = [Sample([1], [10 + i], [0.0], f"r{i}") for i in range(6)]
    # Prompt p0: r1 scored highest but invalid (its 0 placeholder would also beat r0's -0.5);
    # prompt p1: every sample invalid; prompt p2: r5 is the only valid one.
    scores = torch.tensor([-0.5, 0.0, -2.0, 0.0, 0.0, 0.0])
    valid = torch.tensor([True, False, False, False, False, True])
    out = select_best(samples, ["p0", "p1", "p2"], scores, n=2, valid=valid)
    assert [(r.prompt, r.response) for r in out] == [("p0", "r0"), ("p2", "r5")]
    assert out[0].scores[0] == -0.5 and math.isnan(out[0].scores[1])  # invalid: NaN, not 0


def test_report_means_skip_invalid_scores_and_an_empty_mean_is_null():
    assert _mean([1.0, math.nan, 3.0]) == 2.0
    assert _mean([]) is None and _mean([math.nan]) is None
    assert json.dumps({"mean_best_score": _mean([])}) == '{"mean_best_score": null}'
