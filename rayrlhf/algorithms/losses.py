"""PPO policy/value losses and per-token quantities derived from logits.

Convention: ``[B, T]`` tensors over action positions, ``mask`` 1 on action tokens. Losses are
token means over all valid tokens of the batch (:func:`masked_mean` with ``dim=None``).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from rayrlhf.algorithms.masked import masked_mean, masked_var

# Below this Var[returns] explained variance is undefined; we report 0 ("explains nothing").
_EV_VAR_EPS = 1e-8


@dataclass(frozen=True)
class PolicyLossStats:
    """Diagnostics of :func:`ppo_policy_loss`; both 0-dim, detached."""

    approx_kl: Tensor
    clipfrac: Tensor


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, PolicyLossStats]:
    """PPO clipped surrogate loss (Schulman et al. 2017, Eq. 7), negated for minimisation.

    ``rho_t = exp(log pi(a_t) - log pi_old(a_t))``,
    ``l_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))``, ``L = masked_mean(l)``.
    Stats: ``approx_kl = masked_mean((rho - 1) - log rho)`` (k3 estimator of
    KL(pi_old || pi), Schulman 2020; exactly 0 when ``rho == 1``) and ``clipfrac`` = fraction
    of valid tokens where the clipped term is strictly larger (so its gradient is 0).

    Shapes: ``logprobs``, ``old_logprobs``, ``advantages``, ``mask`` ``[B, T]`` -> 0-dim loss.
    """
    valid = mask.bool()
    # Zero the log-ratio on padding: exp of garbage could be inf, and 0 * inf grads are NaN.
    log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    # where (not torch.maximum) so ties send the full gradient through the unclipped branch.
    took_clipped = clipped > unclipped
    per_token = torch.where(took_clipped, clipped, unclipped)
    loss = masked_mean(per_token, mask)

    with torch.no_grad():
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
        clipfrac = masked_mean(took_clipped.to(per_token.dtype), mask)
    return loss, PolicyLossStats(approx_kl=approx_kl, clipfrac=clipfrac)


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
    sq_err = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * masked_mean(sq_err, mask), sq_err.new_zeros(())
    v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    sq_err_clipped = (v_clip - returns) ** 2
    took_clipped = sq_err_clipped > sq_err
    loss = 0.5 * masked_mean(torch.where(took_clipped, sq_err_clipped, sq_err), mask)
    clipfrac = masked_mean(took_clipped.to(sq_err.dtype), mask).detach()
    return loss, clipfrac


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
