"""`RolloutEngine.generate` against a stand-in for vLLM's `LLM`: a prompt's adjacent samples go as
one request with `n`, seeded so that every row keeps the seed it would have alone; stop strings
reach SamplingParams; the prefix cache is emptied before each call; truncation is reported and
DAPO's overlong filter takes truncated rows out of the loss.

vLLM 0.32 seeds child j of a request with seed s as s + j (`ParentRequest`); the real engine is
checked to give the same samples either way in tests/e2e/test_families.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rayrlhf.algorithms.experience import loss_norms
from rayrlhf.config import RolloutConfig
from rayrlhf.recipes.ppo import overlong_filter
from rayrlhf.types import Experience
from rayrlhf.workers.rollout import EngineSample, RolloutEngine, prompt_runs


class FakeLLM:
    """Answers request k, child j with tokens derived from its seed: [seed, seed + 1]."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[dict], list]] = []
        self.resets = 0

    def reset_prefix_cache(self) -> bool:
        self.resets += 1
        return True

    def generate(self, prompts, params, use_tqdm=False):
        assert self.resets == len(self.calls) + 1, "prefix cache not reset before generate"
        self.calls.append((prompts, params))
        outs = []
        for p in params:
            children = []
            for j in reversed(range(p.n)):  # out of order: generate must sort by index
                seed = 0 if p.seed is None else p.seed + j
                ids = [seed % 30 + 3, 2]
                children.append(
                    SimpleNamespace(
                        index=j, token_ids=ids, text=f"s{seed}",
                        logprobs=[{t: SimpleNamespace(logprob=-0.5)} for t in ids],
                        finish_reason="length" if seed % 2 else "stop",
                    )
                )  # fmt: skip
            outs.append(SimpleNamespace(outputs=children))
        return outs


def _engine(**cfg) -> RolloutEngine:
    engine = RolloutEngine.__new__(RolloutEngine)  # no vLLM: the request layout only
    engine.cfg, engine.index, engine.llm = RolloutConfig(**cfg), 0, FakeLLM()
    return engine


def test_prompt_runs_group_adjacent_equal_prompts():
    assert prompt_runs([[1], [1], [2], [1], [1], [1]]) == [(0, 2), (2, 1), (3, 3)]
    assert prompt_runs([]) == []


def test_a_prompts_samples_are_one_request_with_n_and_per_row_seeds():
    engine = _engine(stop=["\n\n", "."])
    rows = [[5, 6]] * 3 + [[7]] * 3
    samples = engine.generate(rows, seed=100).value
    prompts, params = engine.llm.calls[0]
    assert prompts == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7]}]
    assert [(p.n, p.seed) for p in params] == [(3, 100), (3, 103)]
    assert all(p.stop == ["\n\n", "."] and p.max_tokens == 24 for p in params)
    # row i carries the sample of seed 100 + i, as one request per row would
    assert [s.text for s in samples] == [f"s{100 + i}" for i in range(6)]
    assert [s.prompt_ids for s in samples] == rows
    assert all(isinstance(s, EngineSample) for s in samples)
    assert [s.truncated for s in samples] == [i % 2 == 1 for i in range(6)]
    assert samples[0].logprobs == [-0.5, -0.5]


def test_greedy_rows_are_single_requests_without_seeds():
    engine = _engine()
    engine.generate([[5], [5]], seed=7, greedy=True)
    _, params = engine.llm.calls[0]
    assert [(p.n, p.seed, p.temperature) for p in params] == [(1, None, 0.0)] * 2
    assert params[0].stop == []


def test_every_call_resets_the_prefix_cache_first():
    engine = _engine()
    for step in range(3):  # a weight sync may come between any two calls
        engine.generate([[5], [5]], seed=step)
    assert engine.llm.resets == 3


def _experience(mask: torch.Tensor) -> Experience:
    z = torch.zeros_like(mask)
    seq = torch.ones(mask.shape[0], mask.shape[1] + 2, dtype=torch.long)
    return Experience(seq, torch.ones_like(seq), mask, z, z, z, z + 1.0, z)


def test_overlong_filter_takes_truncated_rows_out_of_the_loss_and_its_normaliser():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    cut = [True, False, True, False]
    samples = [EngineSample([1], [2], [0.0], "", 0, truncated=t) for t in cut]
    exp = overlong_filter(_experience(mask), samples)
    assert exp.action_mask.tolist() == [[0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]]
    (norm,) = loss_norms(exp, ranks=1, mini_batches=1, max_len=3)
    assert (norm.tokens, norm.sequences) == (3.0, 2.0)
    assert torch.equal(exp.advantages, torch.ones_like(mask))  # rewards' statistics untouched


@pytest.mark.parametrize("stop", [[], ["</answer>"]])
def test_stop_strings_are_a_typed_list(stop):
    assert RolloutConfig(stop=stop).stop == stop
