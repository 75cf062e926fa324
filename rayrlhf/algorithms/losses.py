"""PPO policy/value losses and per-token quantities derived from logits.

Convention: ``[B, T]`` tensors over action positions, ``mask`` 1 on action tokens. Per-token
losses are reduced by :func:`aggregate` as an :class:`Aggregation` says; the default is the token
mean over all valid tokens of the batch (:func:`masked_mean` with ``dim=None``). Passing the
*global* normaliser (tokens or sequences of the whole step, summed over micro-batches and ranks)
makes the per-micro-batch losses add up to the loss of the whole batch, so accumulated gradients
do not depend on how the batch was split.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import get_args

import torch
from torch import Tensor

from rayrlhf.algorithms.masked import masked_mean, masked_sum, masked_var
from rayrlhf.algorithms.registry import check_names, lookup
from rayrlhf.config import AggregationMode
from rayrlhf.types import LossNorm

# Below this Var[returns] explained variance is undefined; we report 0 ("explains nothing").
_EV_VAR_EPS = 1e-8


def _normaliser(count: float | Tensor, like: Tensor) -> Tensor:
    """``count`` as a 0-dim tensor of ``like``'s dtype/device, clamped to >= 1 (no 0/0)."""
    return torch.as_tensor(count, dtype=like.dtype, device=like.device).clamp(min=1)


def _token_mean(per_token: Tensor, mask: Tensor, norm: LossNorm | None) -> Tensor:
    """``sum_{b,t} m l / N``, ``N`` the valid tokens (this batch's, or ``norm.tokens``)."""
    n_tokens = mask.bool().expand_as(per_token).sum() if norm is None else norm.tokens
    return masked_sum(per_token, mask) / _normaliser(n_tokens, per_token)


def _over_sequences(
    per_seq: Tensor, per_token: Tensor, mask: Tensor, norm: LossNorm | None
) -> Tensor:
    """``sum_b per_seq / S``, ``S`` the rows with a valid token (or ``norm.sequences``).

    Shapes: ``per_seq`` ``[B]``, ``per_token``, ``mask`` ``[B, T]`` -> 0-dim.
    """
    valid_rows = mask.bool().expand_as(per_token).any(dim=1)
    n_seqs = valid_rows.sum() if norm is None else norm.sequences
    return per_seq.sum() / _normaliser(n_seqs, per_token)


def _seq_mean_token_mean(per_token: Tensor, mask: Tensor, norm: LossNorm | None) -> Tensor:
    """``(1/S) sum_b [sum_t m l / sum_t m]``."""
    return _over_sequences(masked_mean(per_token, mask, dim=1), per_token, mask, norm)


def _seq_mean_token_sum(per_token: Tensor, mask: Tensor, norm: LossNorm | None) -> Tensor:
    """``(1/S) sum_b sum_t m l / max_len`` (``max_len`` 1 without a ``norm``)."""
    per_seq = masked_sum(per_token, mask, dim=1) / (1 if norm is None else norm.max_len)
    return _over_sequences(per_seq, per_token, mask, norm)


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, LossNorm | None], Tensor]] = check_names(
    {
        "token_mean": _token_mean,
        "seq_mean_token_mean": _seq_mean_token_mean,
        "seq_mean_token_sum": _seq_mean_token_sum,
    },
    get_args(AggregationMode),
    "loss aggregation",
)


@dataclass(frozen=True)
class Aggregation:
    """How :func:`aggregate` reduces a per-token loss: the mode, and what it divides by.

    ``norm`` holds the counts of the whole optimizer step (``LossNorm``: tokens, sequences,
    ``max_len``); the mode reads the ones it needs. ``None`` normalises by the batch's own
    counts, and ``seq_mean_token_sum`` then skips the division by ``max_len``.

    Raises:
        ValueError: for an unknown ``mode`` (listing the valid ones), or ``norm.max_len <= 0``.
    """

    mode: AggregationMode = "token_mean"
    norm: LossNorm | None = None

    def __post_init__(self) -> None:
        lookup(AGGREGATIONS, self.mode, "loss aggregation")
        if self.norm is not None and self.norm.max_len <= 0:
            raise ValueError(f"LossNorm.max_len must be > 0, got {self.norm.max_len}")


TOKEN_MEAN = Aggregation()
"""The default: the token mean over this batch's valid tokens."""


def aggregate(per_token: Tensor, mask: Tensor, agg: Aggregation = TOKEN_MEAN) -> Tensor:
    """Reduce a per-token loss to a scalar; ``m`` is the mask, ``S`` the sequences (rows).

    * ``"token_mean"``: ``sum_{b,t} m l / N`` with ``N`` the number of valid tokens (every token
      weighs the same; long sequences weigh more). PPO/GRPO-style implementations' default.
    * ``"seq_mean_token_mean"``: ``(1/S) sum_b [sum_t m l / sum_t m]`` (every sequence weighs
      the same; the ``1/|o_i|`` normalisation of the GRPO objective, Shao et al. 2024).
    * ``"seq_mean_token_sum"``: ``(1/S) sum_b sum_t m l``, divided also by the constant
      ``max_len``: the length-unbiased aggregation of Dr. GRPO (Liu et al. 2025,
      "Understanding R1-Zero-Like Training"), where ``max_len`` is the generation budget.

    ``N`` and ``S`` are this batch's counts (``S`` = rows with at least one valid token) when
    ``agg.norm`` is None. For micro-batched / data-parallel training pass the *global* counts
    instead (``LossNorm``): the total number of valid tokens, or of sequences with at least one
    valid token, of the whole optimizer step, summed over all micro-batches and ranks. Then
    every mode is a sum of per-row terms over one constant, so
    ``sum_i aggregate(part_i, ...) == aggregate(whole)`` and accumulated gradients equal those of
    the whole batch; averaging per-micro-batch means instead over-weights micro-batches with few
    tokens. (With data parallelism that averages gradients over ``W`` ranks, multiply by ``W``.)
    Counts are clamped to >= 1, so an empty batch gives 0, never NaN.

    Shapes: ``per_token``, ``mask`` ``[B, T]`` -> 0-dim.
    """
    return AGGREGATIONS[agg.mode](per_token, mask, agg.norm)


@dataclass(frozen=True)
class PolicyLossStats:
    """Diagnostics of :func:`ppo_policy_loss`; all 0-dim, detached, token means over the batch.

    ``dual_clipfrac`` is 0 unless dual-clip is enabled.
    """

    approx_kl: Tensor
    clipfrac: Tensor
    dual_clipfrac: Tensor = field(default_factory=lambda: torch.zeros(()))


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    *,
    dual_clip: float | None = None,
    agg: Aggregation = TOKEN_MEAN,
) -> tuple[Tensor, PolicyLossStats]:
    """PPO clipped surrogate loss (Schulman et al. 2017, Eq. 7), negated for minimisation.

    ``rho_t = exp(log pi(a_t) - log pi_old(a_t))``,
    ``l_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))``. With ``dual_clip = c``
    (``c > 1``; Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL")
    negative-advantage tokens are further bounded, ``l_t = min(l_t, -A_t * c)`` for
    ``A_t < 0``: a huge ratio on a bad action can no longer give an unbounded loss, and those
    tokens get zero gradient. The loss is ``aggregate(l, mask, agg)`` (see :func:`aggregate`;
    the default is the token mean, ``masked_mean(l)``).

    Stats (always local token means): ``approx_kl = masked_mean((rho - 1) - log rho)`` (k3
    estimator of KL(pi_old || pi), Schulman 2020; exactly 0 when ``rho == 1``), ``clipfrac`` =
    fraction of valid tokens where the clipped term is strictly larger (gradient 0), and
    ``dual_clipfrac`` = fraction where the dual-clip bound is strictly smaller (gradient 0).

    Shapes: ``logprobs``, ``old_logprobs``, ``advantages``, ``mask`` ``[B, T]`` -> 0-dim loss.

    Raises:
        ValueError: if ``dual_clip <= 1``.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    valid = mask.bool()
    # Zero the log-ratio on padding: exp of garbage could be inf, and 0 * inf grads are NaN.
    log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    # where (not torch.maximum) so ties send the full gradient through the unclipped branch.
    took_clipped = clipped > unclipped
    per_token = torch.where(took_clipped, clipped, unclipped)
    if dual_clip is None:
        took_dual = torch.zeros_like(took_clipped)
    else:
        bound = -advantages * dual_clip
        took_dual = (advantages < 0) & (bound < per_token)
        per_token = torch.where(took_dual, bound, per_token)
    loss = aggregate(per_token, mask, agg)

    with torch.no_grad():
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
        clipfrac = masked_mean(took_clipped.to(per_token.dtype), mask)
        dual_clipfrac = masked_mean(took_dual.to(per_token.dtype), mask)
    return loss, PolicyLossStats(
        approx_kl=approx_kl, clipfrac=clipfrac, dual_clipfrac=dual_clipfrac
    )


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float | None
) -> tuple[Tensor, Tensor]:
    """Squared-error value loss, optionally with PPO2-style value clipping.

    Unclipped: ``L = 0.5 * masked_mean((V - R)^2)``. Clipped (``clip_eps`` given; as in the
    PPO2 baselines implementation of Schulman et al. 2017):
    ``V_clip = V_old + clip(V - V_old, -eps, eps)``,
    ``L = 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))``.

    Shapes: ``values``, ``old_values``, ``returns``, ``mask`` ``[B, T]`` -> (loss, clipfrac),
    both 0-dim; ``clipfrac`` (detached) is the fraction of valid tokens where the clipped
    error is strictly larger, 0 without clipping.
    """
    # Padding may hold inf/NaN (values, old values or returns): masked_mean drops the value
    # there, but 0 * NaN gradients would still poison ``values.grad``; cut it out of the graph.
    valid = mask.bool()
    values = torch.where(valid, values, torch.zeros_like(values))
    old_values = torch.where(valid, old_values, torch.zeros_like(old_values))
    returns = torch.where(valid, returns, torch.zeros_like(returns))
    sq_err = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * masked_mean(sq_err, mask), sq_err.new_zeros(())
    v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    sq_err_clipped = (v_clip - returns) ** 2
    took_clipped = sq_err_clipped > sq_err
    loss = 0.5 * masked_mean(torch.where(took_clipped, sq_err_clipped, sq_err), mask)
    clipfrac = masked_mean(took_clipped.to(sq_err.dtype), mask).detach()
    return loss, clipfrac


def entropy_bonus(entropy: Tensor, mask: Tensor, agg: Aggregation = TOKEN_MEAN) -> Tensor:
    """Aggregated policy entropy for an entropy bonus (Williams & Peng 1991; Mnih et al. 2016).

    Returns ``aggregate(H, mask, agg)`` (see :func:`aggregate`; use the same aggregation as the
    policy loss). The caller applies the bonus:
    ``loss = policy_loss - coef * entropy_bonus(...)``; keep ``entropy`` attached to the graph
    (e.g. from :func:`entropy_from_logits`) for the bonus to have a gradient.

    Shapes: ``entropy``, ``mask`` ``[B, T]`` -> 0-dim.
    """
    return aggregate(entropy, mask, agg)


def _upcast(logits: Tensor) -> Tensor:
    """Half-precision logits -> float32 (softmax over a large vocab loses accuracy in bf16)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution given by logits.

    ``H = -sum_v p_v log p_v = logsumexp(z) - sum_v softmax(z)_v z_v``; stable because
    ``logsumexp`` and ``softmax`` subtract the max logit internally (no exp overflow).
    Computed in float32 for half-precision inputs. Shapes: ``[B, T, V]`` -> ``[B, T]``.
    """
    z = _upcast(logits)
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of ``labels`` under ``softmax(logits)``.

    ``log p(y_t) = z_{t, y_t} - logsumexp_v z_{t, v}``, via ``log_softmax`` then ``gather``;
    half-precision logits are upcast to float32 first. Shapes: ``logits`` ``[B, T, V]``,
    ``labels`` ``[B, T]`` (integer token ids) -> ``[B, T]``.
    """
    logp = torch.log_softmax(_upcast(logits), dim=-1)
    return logp.gather(dim=-1, index=labels.long().unsqueeze(-1)).squeeze(-1)


ENGINE_LOGPROB_GAP_LIMITS: dict[str, float] = {
    "float32": 1e-3,
    "bfloat16": 0.1,
    "float16": 0.02,
}
"""Largest mean |engine logprob - trainer logprob| over sampled tokens that a correct weight sync
shows, by compute dtype (the dtype both ends run in).

Calibration: fp32 on both ends measures ~1e-6 (the demo recipe). In half precision two correct
implementations disagree by their rounding: bf16 against fp32 forwards of the same weights
differ by a mean of 0.018 (4 layers, hidden 256), 0.025 (6, 384) and 0.035 (8, 512) nats a token
on CPU (`tests/algorithms/test_losses.py` measures the 6-layer case), so two bf16 ends differ by
about sqrt(2) times that; the limit leaves room for depth. fp16 has 3 more mantissa bits (1/8
the rounding). The max over a batch is no check in half precision: for the 6-layer model it is
already 0.107 for a correct forward (0.15 at 8 layers), and it grows with depth and batch size.
These figures come from random-weight models on CPU, not from an 8B run. A corrupted or
missing tensor moves the mean by nats; an engine one PPO step stale can stay under the bf16
limit, which is why the fingerprint, not this, is the sync's proof."""


def engine_logprob_gap_limit(dtype: str) -> float:
    """`ENGINE_LOGPROB_GAP_LIMITS[dtype]` ('float32', 'bfloat16' or 'float16'); ValueError for
    another dtype, listing these."""
    return lookup(ENGINE_LOGPROB_GAP_LIMITS, dtype, "compute dtype")


def pair_gap_limit(trainer_dtype: str, engine_dtype: str) -> float:
    """The mean-gap limit of a trainer and an engine computing in these dtypes: the looser of
    the two ends' (a bf16 engine against an fp32 trainer rounds like bf16)."""
    return max(engine_logprob_gap_limit(trainer_dtype), engine_logprob_gap_limit(engine_dtype))


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """Fraction of return variance explained by the value head, over valid tokens.

    ``EV = 1 - Var_m[R - V] / Var_m[R]`` (population variances). 1 is perfect, 0 is no
    better than predicting the mean, < 0 is worse. If ``Var_m[R] <= 1e-8`` (constant returns,
    or no valid tokens) EV is undefined; we return 0.0 rather than NaN/inf so the metric can be
    logged and averaged safely. Shapes: ``[B, T]`` -> 0-dim, detached.
    """
    with torch.no_grad():
        var_returns = masked_var(returns, mask)
        var_residual = masked_var(returns - values, mask)
        ev = 1.0 - var_residual / var_returns.clamp(min=_EV_VAR_EPS)
        return torch.where(var_returns > _EV_VAR_EPS, ev, torch.zeros_like(ev))
