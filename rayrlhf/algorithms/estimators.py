"""Advantage estimators, their registry by config name, and best-of-N selection.

Convention: ``rewards`` ``[B]`` are sequence-level scores (KL-shaped already if the caller
wants); ``mask`` ``[B, T]`` is 1 on action (response) tokens. Group estimators take ``n``
samples per prompt with rows ``[k*n, (k+1)*n)`` holding the samples of prompt ``k``, so
``B % n == 0``. Every estimator returns per-token advantages ``[B, T]``: the sequence
advantage on each action token and exactly 0 elsewhere. They run under ``no_grad`` (advantages
are constants for the policy loss). A group of one sample, or a group whose rewards are all
equal, carries no learning signal and gets advantage exactly 0 (never NaN).

``valid`` ``[B]`` bool (None: all valid) marks the samples whose reward is real. An invalid
sample (its reward function gave None or NaN; its score is a placeholder 0) is left out of every
statistic -- a group's mean, std and leave-one-out baseline, the batch whitening -- and gets
advantage exactly 0; a group with fewer than two valid samples has no baseline and gets 0.

``ADVANTAGE_ESTIMATORS`` maps each ``algorithm.advantage`` name to one step of that estimator
with a common signature (:data:`AdvantageEstimator`), so a driver calls any of them the same way.
"""

import math
from collections.abc import Callable
from typing import Protocol, get_args

import torch
from torch import Tensor

from rayrlhf.algorithms.advantages import gae, terminal_rewards_with_kl, whiten_advantages
from rayrlhf.algorithms.masked import masked_sum, masked_whiten
from rayrlhf.algorithms.registry import check_names, lookup
from rayrlhf.config import GROUP_ESTIMATORS, AdvantageName, AlgorithmConfig


def _grouped(rewards: Tensor, mask: Tensor, n: int) -> Tensor:
    """``rewards`` ``[B]`` as a float ``[B // n, n]`` view, after checking the layout."""
    if rewards.dim() != 1 or mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"expected rewards [B] and mask [B, T], got {tuple(rewards.shape)}, {tuple(mask.shape)}"
        )
    if n < 1 or rewards.shape[0] % n != 0:
        raise ValueError(f"batch size {rewards.shape[0]} is not a multiple of group size {n}")
    r = rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())
    return r.view(-1, n)


def _validity(valid: Tensor | None, like: Tensor) -> Tensor:
    """``valid`` ``[B]`` (None: all True) as a bool tensor shaped like ``like`` (``[B]`` or
    ``[G, n]``), after checking it has one entry per sample."""
    if valid is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    if valid.dim() != 1 or valid.numel() != like.numel():
        raise ValueError(f"expected valid [B] with B={like.numel()}, got {tuple(valid.shape)}")
    return valid.to(device=like.device, dtype=torch.bool).view(like.shape)


def _centered(groups: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """``(r - mean_valid(group), count)`` per row of ``[G, n]``, with ``valid`` ``[G, n]`` bool
    and ``count`` ``[G, 1]`` the valid samples of each group. The centred reward is exactly 0
    on invalid samples and in groups whose valid rewards are all equal (fewer than two valid
    included): a float mean of equal values can differ from them by one ulp, which GRPO's
    division by a ~0 std would blow up.
    """
    count = valid.sum(dim=1, keepdim=True)
    mean = masked_sum(groups, valid, dim=1).unsqueeze(1) / count.clamp(min=1)
    top = torch.where(valid, groups, -math.inf).amax(dim=1, keepdim=True)
    low = torch.where(valid, groups, math.inf).amin(dim=1, keepdim=True)
    keep = valid & (top > low)  # False with 0 valid (-inf > inf) or 1 valid (top == low)
    centered = torch.where(keep, groups - mean, torch.zeros_like(groups))
    return centered, count.to(groups.dtype)


def _broadcast(seq_advantages: Tensor, mask: Tensor) -> Tensor:
    """Sequence advantages ``[G, n]`` -> ``[B, T]`` on action tokens, exactly 0 elsewhere."""
    per_row = seq_advantages.reshape(-1, 1).expand(mask.shape)
    return torch.where(mask.bool(), per_row, torch.zeros_like(per_row))


@torch.no_grad()
def grpo_advantages(
    rewards: Tensor, mask: Tensor, n: int, eps: float = 1e-6, *, valid: Tensor | None = None
) -> Tensor:
    """GRPO outcome advantages (Shao et al. 2024, "DeepSeekMath", Sec. 4.1.2).

    ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)`` over the valid samples ``g`` of a prompt's
    ``n``. ``std`` is the unbiased (Bessel, ``k - 1`` for ``k`` valid samples) sample std, as
    ``torch.std`` computes it in the common GRPO implementations; for ``n = 2`` and rewards
    ``{0, 1}`` this gives ``+-1/sqrt(2)``. Groups of one valid sample or of equal rewards, and
    invalid samples, give 0.

    Shapes: ``rewards`` ``[B]``, ``mask`` ``[B, T]``, ``valid`` ``[B]`` bool or None ->
    ``[B, T]``.
    """
    groups = _grouped(rewards, mask, n)
    centered, count = _centered(groups, _validity(valid, groups))
    std = (centered.pow(2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
    return _broadcast(centered / (std + eps), mask)


@torch.no_grad()
def dr_grpo_advantages(
    rewards: Tensor, mask: Tensor, n: int, *, valid: Tensor | None = None
) -> Tensor:
    """Dr. GRPO advantages ``A_i = r_i - mean_g(r)`` (Liu et al. 2025, "Understanding
    R1-Zero-Like Training: A Critical Perspective"): GRPO without the std division, which
    over-weights prompts that are nearly always (or never) solved. The mean is over the valid
    samples ``g``; invalid samples give 0.

    Dr. GRPO also removes GRPO's per-response length normalisation ``1/|o_i|``: aggregate the
    loss with ``loss_aggregation: seq_mean_token_sum`` and its constant ``max_len`` (the
    generation budget), not ``"seq_mean_token_mean"``. Shapes: ``rewards`` ``[B]``, ``mask``
    ``[B, T]``, ``valid`` ``[B]`` bool or None -> ``[B, T]``.
    """
    groups = _grouped(rewards, mask, n)
    centered, _ = _centered(groups, _validity(valid, groups))
    return _broadcast(centered, mask)


@torch.no_grad()
def rloo_advantages(
    rewards: Tensor, mask: Tensor, n: int, *, valid: Tensor | None = None
) -> Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, "Back to Basics").

    ``A_i = r_i - (1/(k-1)) sum_{j != i} r_j = k/(k-1) * (r_i - mean_g(r))`` over the ``k``
    valid samples ``g`` of a prompt: the baseline of each sample is the mean reward of the
    other valid samples of its prompt, so it is unbiased. ``k < 2`` (no other valid sample)
    and invalid samples give 0. Shapes: ``rewards`` ``[B]``, ``mask`` ``[B, T]``, ``valid``
    ``[B]`` bool or None -> ``[B, T]``.
    """
    groups = _grouped(rewards, mask, n)
    centered, count = _centered(groups, _validity(valid, groups))
    return _broadcast(centered * (count / (count - 1).clamp(min=1)), mask)


def _reward_to_go(token_rewards: Tensor, gamma: float) -> Tensor:
    """``G_t = r_t + gamma * G_{t+1}`` along dim 1, ``G_T = 0``. ``[B, T]`` -> ``[B, T]``."""
    if gamma == 1.0:
        return token_rewards.flip(1).cumsum(dim=1).flip(1)
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in range(token_rewards.shape[1] - 1, -1, -1):
        running = token_rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns


def _valid_mask(mask: Tensor, valid: Tensor | None) -> Tensor:
    """``mask`` ``[B, T]`` with the rows of invalid samples zeroed (``valid`` ``[B]``)."""
    if valid is None:
        return mask
    keep = _validity(valid, mask[:, 0]).unsqueeze(1)
    return torch.where(keep, mask, torch.zeros_like(mask))


@torch.no_grad()
def reinforce_pp_advantages(
    rewards: Tensor,
    mask: Tensor,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    *,
    valid: Tensor | None = None,
) -> Tensor:
    """REINFORCE++ advantages (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for
    Aligning Large Language Models"): token-level KL-shaped returns, whitened over the batch.

    ``r_t = -kl_coef * KL_t + 1[t = t_last] * R`` on action tokens
    (:func:`~rayrlhf.algorithms.advantages.terminal_rewards_with_kl`; ``kl=None`` means no
    penalty), ``G_t = sum_{s >= t} gamma^(s-t) r_s`` (discounted reward-to-go; the paper's
    ``gamma = 1`` is the default), then
    ``A = (G - mean) / sqrt(Var + 1e-8)`` with the GLOBAL mean / population variance over all
    action tokens of the valid samples of the batch
    (:func:`~rayrlhf.algorithms.masked.masked_whiten`); invalid samples' rows are 0. There are
    no groups; a batch whose returns are all equal (e.g. one row, no KL) gets exactly 0.

    Shapes: ``rewards`` ``[B]``, ``mask`` ``[B, T]``, ``kl`` ``[B, T]`` or None, ``valid``
    ``[B]`` bool or None -> ``[B, T]``.
    """
    r = _grouped(rewards, mask, 1).view(-1)
    mask = _valid_mask(mask, valid)
    kl = torch.zeros(mask.shape, dtype=r.dtype, device=r.device) if kl is None else kl
    token_rewards = terminal_rewards_with_kl(r, kl, mask, kl_coef)
    returns = _reward_to_go(token_rewards, gamma)
    valid_returns = returns[mask.bool()]
    if valid_returns.numel() == 0 or bool(valid_returns.max() == valid_returns.min()):
        # Whitening would amplify the mean's rounding error by 1/sqrt(eps) = 1e4.
        return torch.zeros_like(returns)
    return masked_whiten(returns, mask)


class AdvantageEstimator(Protocol):
    """``(rewards [B], kl [B, R], beta, values [B, R], mask [B, R], algo, valid [B] bool or
    None) -> (advantages, returns)``, both ``[B, R]``: one step's advantages from shaped
    sequence rewards, the per-token KL to the reference, its coefficient ``beta`` (0 when the
    KL is a loss term), the critic's values and which samples' rewards are valid (None: all).
    Invalid samples get advantages and returns of 0 and enter no statistic. Critic-free
    estimators return ``returns`` of zeros (there is no critic to fit)."""

    def __call__(
        self,
        rewards: Tensor,
        kl: Tensor,
        beta: float,
        values: Tensor,
        mask: Tensor,
        algo: AlgorithmConfig,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]: ...


def _gae_step(rewards, kl, beta, values, mask, algo, valid=None) -> tuple[Tensor, Tensor]:
    """GAE on ``-beta * KL_t`` plus the terminal reward; whitened (over the valid samples'
    tokens) if ``algo`` says so."""
    mask = _valid_mask(mask, valid)
    token_rewards = terminal_rewards_with_kl(rewards, kl, mask, beta)
    advantages, returns = gae(token_rewards, values, mask, algo.gamma, algo.lam)
    return (whiten_advantages(advantages, mask) if algo.whiten_advantages else advantages), returns


def _reinforce_pp_step(rewards, kl, beta, values, mask, algo, valid=None) -> tuple[Tensor, Tensor]:
    """REINFORCE++ with the KL penalty on the token rewards, discounted by ``algo.gamma``."""
    advantages = reinforce_pp_advantages(
        rewards, mask, kl=kl, kl_coef=beta, gamma=algo.gamma, valid=valid
    )
    return advantages, torch.zeros_like(mask)


def _group_step(fn: Callable[..., Tensor]) -> AdvantageEstimator:
    """A ``(rewards, mask, n, *, valid)`` group estimator as an :data:`AdvantageEstimator`."""

    def step(rewards, kl, beta, values, mask, algo, valid=None) -> tuple[Tensor, Tensor]:
        # The KL penalty of a critic-free estimator is charged to the sequence reward.
        shaped = rewards - beta * masked_sum(kl, mask, dim=1)
        advantages = fn(shaped, mask, algo.n_samples_per_prompt, valid=valid)
        return advantages, torch.zeros_like(mask)

    return step


# The estimators that compare the samples of a prompt are exactly config's GROUP_ESTIMATORS.
_GROUP_STEPS = check_names(
    {
        "grpo": _group_step(grpo_advantages),
        "dr_grpo": _group_step(dr_grpo_advantages),
        "rloo": _group_step(rloo_advantages),
    },
    GROUP_ESTIMATORS,
    "group advantage estimator",
)

ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = check_names(
    {"gae": _gae_step, "reinforce_pp": _reinforce_pp_step, **_GROUP_STEPS},
    get_args(AdvantageName),
    "advantage estimator",
)


def get_estimator(name: str) -> AdvantageEstimator:
    """The step registered as ``name`` (signature: :class:`AdvantageEstimator`).

    Raises:
        ValueError: if ``name`` is not one of ``ADVANTAGE_ESTIMATORS`` (the message lists them).
    """
    return lookup(ADVANTAGE_ESTIMATORS, name, "advantage estimator")


NO_PICK = -1
"""What :func:`best_of_n` returns for a prompt none of whose samples is valid."""


def best_of_n(scores: Tensor, n: int, valid: Tensor | None = None) -> Tensor:
    """Best-of-N selection (rejection sampling; cf. Nakano et al. 2021, Touvron et al. 2023).

    For each group of ``n`` consecutive rows (the samples of one prompt) returns the row index
    ``k*n + j`` in ``[0, B)`` of the highest score among the valid samples (``valid`` ``[B]``
    bool, None: all), the first one on ties, so that ``batch[best_of_n(scores, n)]`` selects
    the winners. An invalid sample is never picked: a group with no valid sample gets
    :data:`NO_PICK`. Shapes: ``scores`` ``[B]`` -> ``LongTensor [B // n]``.

    Raises:
        ValueError: if ``scores`` is not 1-D or ``B`` is not a multiple of ``n``.
    """
    if scores.dim() != 1 or n < 1 or scores.shape[0] % n != 0:
        raise ValueError(f"expected scores [B] with B a multiple of n={n}, got {scores.shape}")
    ok = _validity(valid, scores).view(-1, n)
    # -inf rather than the placeholder score: an invalid sample (its 0, or a NaN, which argmax
    # would prefer) must lose to every valid one.
    ranked = torch.where(ok, scores.view(-1, n).to(torch.float64), -math.inf)
    picks = ranked.argmax(dim=1) + torch.arange(0, scores.shape[0], n, device=scores.device)
    return torch.where(ok.any(dim=1), picks, torch.full_like(picks, NO_PICK))
