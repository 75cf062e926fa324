"""Token-level rewards and Generalized Advantage Estimation for RLHF-PPO.

Convention: ``[B, T]`` tensors over action positions; ``mask`` is 1 on the (contiguous)
response tokens of each row and 0 on left prompt positions and right padding.
"""

import torch
from torch import Tensor

from rayrlhf.algorithms.masked import masked_whiten


def terminal_rewards_with_kl(rewards: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards: KL penalty on every action token, scalar reward on the last one.

    ``r_t = -beta * KL_t * m_t + 1[t = t_last] * R`` (Ziegler et al. 2019, with the
    sequence-level reward model score ``R`` given at the final action token ``t_last``, the
    largest ``t`` with ``m_t = 1``). Rows whose mask is all zero get no reward and are all 0.

    Shapes: ``rewards`` ``[B]``, ``kl`` ``[B, T]``, ``mask`` ``[B, T]`` -> ``[B, T]``.
    """
    valid = mask.bool()
    token_rewards = torch.where(valid, -kl_coef * kl, torch.zeros_like(kl))
    positions = torch.arange(kl.shape[1], device=kl.device).expand_as(valid)
    # Index of the last valid token per row; -1 (then clamped, with weight 0) if none.
    last = torch.where(valid, positions, torch.full_like(positions, -1)).amax(dim=1)
    has_action = (last >= 0).to(token_rewards.dtype)
    terminal = (rewards.to(token_rewards.dtype) * has_action).unsqueeze(1)
    return token_rewards.scatter_add(1, last.clamp(min=0).unsqueeze(1), terminal)


@torch.no_grad()
def gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, Sec. 3).

    Backwards over ``t`` with ``m`` the mask and the value after the last action token 0::

        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
        R_t     = A_t + V_t                     (lambda-returns, value targets)

    The ``m_{t+1}`` factor ends the episode at the last action token (right padding) and
    left prompt positions are zeroed, so padded rows equal the unpadded row shifted. Assumes
    each row's action tokens are contiguous. Runs under ``no_grad``: advantages and returns
    are constants (targets) for the PPO losses.

    Shapes: ``token_rewards``, ``values``, ``mask`` ``[B, T]`` -> (advantages, returns),
    both ``[B, T]`` with exact zeros at masked positions.
    """
    valid = mask.bool()
    m = valid.to(values.dtype)
    # Zero padding first so garbage values/rewards there can never leak into valid tokens.
    r = torch.where(valid, token_rewards.to(values.dtype), torch.zeros_like(values))
    v = torch.where(valid, values, torch.zeros_like(values))

    next_value = torch.zeros_like(v[:, 0])
    next_adv = torch.zeros_like(v[:, 0])
    next_mask = torch.zeros_like(v[:, 0])
    advs_reversed = []
    for t in reversed(range(v.shape[1])):
        delta = r[:, t] + gamma * next_value * next_mask - v[:, t]
        adv = (delta + gamma * lam * next_mask * next_adv) * m[:, t]
        advs_reversed.append(adv)
        next_value, next_adv, next_mask = v[:, t], adv, m[:, t]

    advantages = torch.stack(advs_reversed[::-1], dim=1)
    returns = (advantages + v) * m
    return advantages, returns


def whiten_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Normalise advantages to masked mean 0 / std 1 over the whole batch.

    ``A' = (A - mean_m(A)) / sqrt(Var_m(A) + eps)``, zero at masked positions (standard PPO
    practice, cf. Schulman et al. 2017 baselines). Shapes: ``[B, T]`` -> ``[B, T]``.
    """
    return masked_whiten(advantages, mask, shift_mean=True)
