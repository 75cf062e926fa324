"""Per-token KL estimators and KL-penalty coefficient controllers.

Estimators follow J. Schulman, "Approximating KL Divergence" (blog post, 2020). With tokens
sampled from the policy ``p`` and ``log_ratio = log p(x) - log p_ref(x)``, each estimator's
expectation under ``p`` relates to ``KL(p || p_ref)``:

* ``k1 = log_ratio``                        unbiased, high variance, can be negative;
* ``k2 = 0.5 * log_ratio**2``               biased, low variance, always >= 0;
* ``k3 = (r - 1) - log r``, ``r = p_ref/p``  unbiased, low variance, always >= 0.

The controllers implement the KL coefficient ``beta`` of Ziegler et al. 2019, "Fine-Tuning
Language Models from Human Preferences".

The KL to the reference model is used in one of two ways:

* **reward penalty** (Ziegler et al. 2019; PPO, REINFORCE++): :func:`kl_estimate` per token,
  detached, enters the rewards as ``-beta * KL_t`` (``terminal_rewards_with_kl``) and reaches
  the policy only through the advantages; k1 is the usual choice.
* **loss term** (GRPO, Shao et al. 2024, Eq. 4): :func:`kl_loss_term` is differentiated
  directly, ``loss = policy_loss + beta * kl_loss_term(...)``, and the rewards carry no KL.
  Use k3 here: it is >= 0 and its gradient vanishes at ``pi == pi_ref``. The k1 loss has
  ``d k1 / d log pi = 1`` on every sampled token whatever the KL, a gradient that is zero in
  expectation (``E_pi[grad log pi] = 0``) and so does not pull the policy towards ``pi_ref``.
"""

import math
from collections.abc import Callable
from typing import get_args

import torch
from torch import Tensor

from rayrlhf.algorithms.losses import TOKEN_MEAN, Aggregation, aggregate
from rayrlhf.algorithms.registry import check_names, lookup
from rayrlhf.config import AlgorithmConfig, KLEstimatorName

# A token the policy finds near-impossible can give a log-ratio of -100 or worse; exp(100)
# overflows float32/bf16 to inf and poisons the KL mean and its gradient. exp(20) ~ 4.9e8 is
# finite in float32/bf16 and already far beyond any meaningful per-token KL.
_K3_LOG_RATIO_CLAMP = 20.0


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 estimator: ``log p(x) - log p_ref(x)`` (Schulman 2020). ``[B, T]`` -> ``[B, T]``."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 estimator: ``0.5 * (log p(x) - log p_ref(x))**2`` (Schulman 2020). ``[B, T]``."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 estimator: ``exp(-d) - 1 + d`` with ``d = log p - log p_ref`` (Schulman 2020).

    Equivalently ``r - 1 - log r`` with ``r = p_ref/p``; ``>= 0`` since ``log r <= r - 1``.
    ``d`` is clamped to ``[-20, 20]`` (both terms, so the result is still ``>= 0``); gradients
    vanish outside that range. Shapes: ``[B, T]`` -> ``[B, T]``.

    Computed as ``expm1(-d) + d``: near ``d = 0``, ``exp(-d) - 1`` cancels catastrophically and
    the float32 result dips below zero (by ~6e-8 for ``|d| ~ 1e-4``); ``expm1`` keeps it >= 0.
    """
    log_ratio = (logprobs - ref_logprobs).clamp(-_K3_LOG_RATIO_CLAMP, _K3_LOG_RATIO_CLAMP)
    return torch.expm1(-log_ratio) + log_ratio


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = check_names(
    {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}, get_args(KLEstimatorName), "KL estimator"
)


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: KLEstimatorName = "k1") -> Tensor:
    """Per-token KL estimate ``KL_ESTIMATORS[kind](logprobs, ref_logprobs)``.

    Shapes: ``logprobs``, ``ref_logprobs`` ``[B, T]`` (log-probs of the sampled action tokens
    under the policy and the reference model) -> ``[B, T]``. No mask is applied here: the
    caller zeroes non-action positions (e.g. :func:`terminal_rewards_with_kl` does).

    Raises:
        ValueError: if ``kind`` is not one of ``KL_ESTIMATORS`` (the message lists them).
    """
    return lookup(KL_ESTIMATORS, kind, "KL estimator")(logprobs, ref_logprobs)


def kl_loss_term(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kind: KLEstimatorName = "k3",
    *,
    agg: Aggregation = TOKEN_MEAN,
) -> Tensor:
    """KL to the reference as a differentiable loss term (GRPO, Shao et al. 2024, Eq. 4).

    ``L_KL = aggregate(kl_estimate(logprobs, ref_logprobs, kind), mask, agg)``; with the
    defaults the masked token mean of the k3 estimator, as in GRPO. Pass the same aggregation
    (mode and global normaliser) as the policy loss (see ``losses.aggregate``) so that
    ``policy_loss + beta * L_KL`` adds up correctly over micro-batches. Gradients flow into
    ``logprobs`` (``ref_logprobs`` is a constant); garbage at masked positions is ignored.

    Shapes: ``logprobs``, ``ref_logprobs``, ``mask`` ``[B, T]`` -> 0-dim.

    Raises:
        ValueError: for an unknown ``kind``.
    """
    # Cut padding out of the graph: aggregate() drops garbage values there, but a NaN/inf
    # estimate would still send 0 * NaN = NaN gradients (e.g. k2's d * grad) to ``logprobs``.
    lp = torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs))
    return aggregate(kl_estimate(lp, ref_logprobs, kind), mask, agg)


class FixedKLController:
    """Constant KL coefficient ``beta`` (Ziegler et al. 2019, non-adaptive baseline)."""

    def __init__(self, kl_coef: float) -> None:
        self.value: float = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient never changes."""


class AdaptiveKLController:
    """Ziegler et al. (2019)'s controller for the KL coefficient, with damping and anti-windup.

    With the clipped error ``e = clip(KL / KL_target - 1, -0.2, 0.2)``, Ziegler's update is
    ``beta_I <- beta_I * (1 + e * n_steps / H)`` (``H``, the horizon: beta moves at most 20% per
    horizon's worth of samples). That is an integral controller, and the policy's KL itself
    integrates how far beta sits from the value that holds it still, so the loop is two
    integrators in series and oscillates: measured on the demo task with target 3, KL swung
    between 1.4 and 10 for as long as the run lasted. A proportional term damps it:
    ``beta = beta_I * exp(gain * e)``; ``gain = 0`` is Ziegler's controller exactly.

    ``beta`` and ``beta_I`` stay within ``[min_coef, max_coef]``. Without a floor the integral
    winds up: a run starts at KL = 0, below any target, so beta shrinks geometrically until
    the policy starts to move, and is then far too small to catch the overshoot.
    """

    def __init__(
        self,
        init_kl_coef: float,
        target: float,
        horizon: int,
        gain: float = 0.0,
        min_coef: float = 0.0,
        max_coef: float = float("inf"),
    ) -> None:
        if target <= 0 or horizon <= 0 or gain < 0:
            raise ValueError(f"need target, horizon > 0, gain >= 0: {target=} {horizon=} {gain=}")
        if not 0 <= min_coef <= init_kl_coef <= max_coef:
            raise ValueError(
                f"need 0 <= min_coef <= init_kl_coef <= max_coef, got "
                f"{min_coef=} {init_kl_coef=} {max_coef=}"
            )
        self.value: float = float(init_kl_coef)
        self.integral = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon
        self.gain = float(gain)
        self.min_coef = float(min_coef)
        self.max_coef = float(max_coef)

    def _clamp(self, beta: float) -> float:
        return min(max(beta, self.min_coef), self.max_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Apply one controller step for ``n_steps`` environment steps (samples).

        A batch of more than one horizon counts as ``k = ceil(n_steps / H)`` updates of
        ``n_steps / k`` samples each: Ziegler's factor ``1 + e * n_steps / H`` alone reaches 0
        at ``n_steps = 5 H`` with KL below target, and a coefficient at 0 never moves again
        (the update is multiplicative). Each sub-update moves beta by at most 20%, so it stays
        positive; for ``n_steps <= H`` this is Ziegler's update exactly.
        """
        error = current_kl / self.target - 1.0
        k = max(1, math.ceil(n_steps / self.horizon))
        step = min(max(error, -0.2), 0.2) * n_steps / (self.horizon * k)
        self.integral = self._clamp(self.integral * (1.0 + step) ** k)
        # The damping term must see how far off KL is: clipped at +-0.2 like the integral's
        # error, it saturates just as the oscillation grows.
        self.value = self._clamp(self.integral * math.exp(self.gain * min(max(error, -1.0), 1.0)))


def kl_controller(algo: AlgorithmConfig) -> FixedKLController | AdaptiveKLController:
    """The controller `algorithm.kl_controller` names, set up from the algorithm section."""
    if algo.kl_controller == "adaptive":
        return AdaptiveKLController(
            algo.kl_coef,
            algo.kl_target,
            algo.kl_horizon,
            gain=algo.kl_gain,
            min_coef=algo.kl_coef_min,
            max_coef=algo.kl_coef_max or float("inf"),
        )
    return FixedKLController(algo.kl_coef)
