"""Per-token KL estimators and KL-penalty coefficient controllers.

Estimators follow J. Schulman, "Approximating KL Divergence" (blog post, 2020). With tokens
sampled from the policy ``p`` and ``log_ratio = log p(x) - log p_ref(x)``, each estimator's
expectation under ``p`` relates to ``KL(p || p_ref)``:

* ``k1 = log_ratio``                        unbiased, high variance, can be negative;
* ``k2 = 0.5 * log_ratio**2``               biased, low variance, always >= 0;
* ``k3 = (r - 1) - log r``, ``r = p_ref/p``  unbiased, low variance, always >= 0.

The controllers implement the KL coefficient ``beta`` of Ziegler et al. 2019, "Fine-Tuning
Language Models from Human Preferences".
"""

from collections.abc import Callable

import torch
from torch import Tensor

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
    """
    log_ratio = (logprobs - ref_logprobs).clamp(-_K3_LOG_RATIO_CLAMP, _K3_LOG_RATIO_CLAMP)
    return torch.exp(-log_ratio) - 1 + log_ratio


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token KL estimate ``KL_ESTIMATORS[kind](logprobs, ref_logprobs)``.

    Shapes: ``logprobs``, ``ref_logprobs`` ``[B, T]`` (log-probs of the sampled action tokens
    under the policy and the reference model) -> ``[B, T]``. No mask is applied here: the
    caller zeroes non-action positions (e.g. :func:`terminal_rewards_with_kl` does).

    Raises:
        ValueError: if ``kind`` is not one of ``KL_ESTIMATORS``.
    """
    try:
        estimator = KL_ESTIMATORS[kind]
    except KeyError:
        valid = ", ".join(sorted(KL_ESTIMATORS))
        raise ValueError(f"unknown KL estimator {kind!r}; valid names: {valid}") from None
    return estimator(logprobs, ref_logprobs)


class FixedKLController:
    """Constant KL coefficient ``beta`` (Ziegler et al. 2019, non-adaptive baseline)."""

    def __init__(self, kl_coef: float) -> None:
        self.value: float = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient never changes."""


class AdaptiveKLController:
    """Proportional controller for the KL coefficient (Ziegler et al. 2019).

    ``e = clip(KL / KL_target - 1, -0.2, 0.2)`` and ``beta <- beta * (1 + e * n_steps / H)``,
    where ``H`` is the horizon: the coefficient moves towards the value that holds the
    observed KL at ``target``, by at most 20% per horizon's worth of steps.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target=} {horizon=}")
        self.value: float = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Apply one controller step for ``n_steps`` environment steps (samples)."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
