"""The reward contract: loading user reward functions, calling them, checking and combining.

A reward function is `fn(prompts, responses, rows)`, sync or `async def`, over a batch of B
samples: `rows[i]` is sample i's dataset row without its prompt column (`Rollout.rows`). It
returns B values, each a float or a dict with a float `score` and named float extras
(`{"score": 1.0, "accuracy": 1.0}`). A legacy `fn(prompts, responses)` (two positional
parameters) is called without rows.

    load       `load_reward_fn('module:function', weight)` -> `RewardFn` (import errors name it)
    call       `RewardFn.__call__` / `score_async`: async functions awaited, terms concurrently
    normalise  per sample a score (NaN for None, NaN or inf: the sample is invalid) and extras;
               a wrong length or type is a `RewardFnError` naming the function
    combine    `combine(terms)`: sum of weight x score, valid only where every term is

Invalid samples get score 0 and `valid` False in the `RewardOutput`; the driver masks them.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rayrlhf.types import RewardOutput


class RewardFnError(RuntimeError):
    """A reward function that cannot be loaded, raised, or returned something off-contract.
    The message starts with `reward function '<spec>'`."""


@dataclass(frozen=True)
class TermScores:
    """One reward term's result for B samples."""

    scores: Tensor
    """[B] float32; NaN where the sample has no valid score."""
    extras: dict[str, Tensor]
    """name -> [B] float32 extras; NaN where a sample has none."""


class RewardFn:
    """A reward function of the contract, with its weight. `spec` names it in every error."""

    def __init__(self, spec: str, fn: Callable, weight: float = 1.0) -> None:
        if not callable(fn):
            raise RewardFnError(f"reward function {spec!r} is not callable")
        self.spec, self.fn, self.weight = spec, fn, weight
        self.takes_rows = _takes_rows(fn)

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], rows: Sequence[dict]
    ) -> TermScores:
        """Call it (running an async one to completion) and normalise its result."""
        return asyncio.run(self.score_async(prompts, responses, rows))

    async def score_async(
        self, prompts: Sequence[str], responses: Sequence[str], rows: Sequence[dict]
    ) -> TermScores:
        """Call it from a running event loop; errors are `RewardFnError` naming the function."""
        args = (list(prompts), list(responses)) + ((list(rows),) if self.takes_rows else ())
        try:
            out = self.fn(*args)
            if inspect.isawaitable(out):
                out = await out
        except RewardFnError:
            raise
        except Exception as err:
            raise RewardFnError(
                f"reward function {self.spec!r} raised {type(err).__name__}: {err}"
            ) from err
        return normalise(self.spec, out, len(args[0]))


def load_reward_fn(spec: str, weight: float = 1.0) -> RewardFn:
    """Import 'module:function' (any callable: a function, or an object with `__call__`)."""
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        raise RewardFnError(f"reward function {spec!r} must look like 'module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as err:
        raise RewardFnError(f"reward function {spec!r} cannot be loaded: {err}") from None
    return RewardFn(spec, fn, weight)


def _takes_rows(fn: Callable) -> bool:
    """Whether `fn` accepts a third positional argument (else it is a legacy two-argument one)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: assume the contract
        return True
    kinds = [p.kind for p in params]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(k in positional for k in kinds) >= 3


def normalise(spec: str, out: object, n: int) -> TermScores:
    """Check a function's result for `n` samples and turn it into tensors."""
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
        raise RewardFnError(
            f"reward function {spec!r} returned {type(out).__name__}; expected a list of "
            f"{n} floats or dicts"
        )
    values = list(out)
    if len(values) != n:
        raise RewardFnError(
            f"reward function {spec!r} returned {len(values)} values for {n} samples"
        )
    scores = torch.full((n,), math.nan)
    extras: dict[str, Tensor] = {}
    for i, value in enumerate(values):
        if isinstance(value, dict):
            if "score" not in value:
                raise RewardFnError(
                    f"reward function {spec!r}: sample {i} is a dict without 'score': {value!r}"
                )
            for name, extra in value.items():
                if name != "score":
                    column = extras.setdefault(name, torch.full((n,), math.nan))
                    column[i] = _number(spec, i, extra, name)
            value = value["score"]
        scores[i] = _number(spec, i, value, "score")
    return TermScores(scores, extras)


def _number(spec: str, i: int, value: object, what: str) -> float:
    """A float, or NaN for None, NaN or inf (an invalid sample); anything else is an error."""
    if value is None:
        return math.nan
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise RewardFnError(
            f"reward function {spec!r}: sample {i}'s {what} is {type(value).__name__} "
            f"{value!r}, not a number"
        )
    number = float(value)
    return number if math.isfinite(number) else math.nan


def combine(terms: Sequence[tuple[str, float, TermScores]]) -> RewardOutput:
    """The reward of (spec, weight, scores) terms: sum of weight x score, valid where every
    term's score is finite. Two terms reporting the same extra are an error."""
    if not terms:
        raise ValueError("no reward terms to combine")
    n = terms[0][2].scores.shape[0]
    total, valid = torch.zeros(n), torch.ones(n, dtype=torch.bool)
    extras: dict[str, Tensor] = {}
    owner: dict[str, str] = {}
    for spec, weight, term in terms:
        valid &= torch.isfinite(term.scores)
        total += weight * torch.nan_to_num(term.scores, nan=0.0)
        for name, column in term.extras.items():
            if name in owner:
                raise RewardFnError(
                    f"reward function {spec!r} reports extra {name!r}, as {owner[name]!r} "
                    "does; rename one"
                )
            owner[name], extras[name] = spec, column
    return RewardOutput(torch.where(valid, total, torch.zeros(n)), valid, extras)


async def score_terms(
    fns: Sequence[RewardFn], prompts: Sequence[str], responses: Sequence[str], rows: Sequence[dict]
) -> list[TermScores]:
    """Every function's scores, the async ones concurrently (a remote scorer and a local rule
    overlap)."""
    return list(await asyncio.gather(*(f.score_async(prompts, responses, rows) for f in fns)))
