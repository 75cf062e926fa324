"""Best-of-N selection on engine samples (the actors are exercised in tests/e2e/)."""

import torch

from rayrlhf.recipes.best_of_n import select_best
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
