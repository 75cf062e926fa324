"""Preference losses: DPO and variants, and the Bradley-Terry reward-model loss.

Convention: a batch of ``B`` preference pairs; ``*_logps`` are sequence log-probabilities
``[B]`` (the sum of the response's token log-probs, see :func:`sequence_logps`) under the
policy being trained and the frozen reference model.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rayrlhf.algorithms.masked import masked_sum

DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo")


@dataclass(frozen=True)
class DPOStats:
    """Diagnostics of :func:`dpo_loss`, all detached.

    ``chosen_rewards`` / ``rejected_rewards`` ``[B]`` are the implicit rewards
    ``beta * (log pi - log pi_ref)``; ``reward_accuracy`` (0-dim) is the fraction of pairs with
    ``chosen_rewards > rejected_rewards``; ``reward_margin`` (0-dim) is the mean of
    ``chosen_rewards - rejected_rewards``.
    """

    chosen_rewards: Tensor
    rejected_rewards: Tensor
    reward_accuracy: Tensor
    reward_margin: Tensor


def sequence_logps(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Sequence log-probability ``log pi(y|x) = sum_t m_t log pi(y_t | x, y_<t)``.

    Garbage at masked positions is ignored; an all-zero mask gives 0. Shapes:
    ``token_logprobs``, ``mask`` ``[B, T]`` -> ``[B]``.
    """
    return masked_sum(token_logprobs, mask, dim=1)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[Tensor, DPOStats]:
    """Direct Preference Optimization loss and its IPO / conservative variants.

    With ``h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l))`` per pair:

    * ``"sigmoid"``: ``-log sigmoid(beta * h)`` (Rafailov et al. 2023, Eq. 7). With
      ``label_smoothing = eps`` > 0 it is conservative DPO (cDPO; Mitchell 2023, "A note on DPO
      with noisy preferences"), which assumes labels are flipped with probability ``eps``:
      ``-(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)``.
    * ``"ipo"``: ``(h - 1/(2 * beta))^2`` (Azar et al. 2023, "A General Theoretical Paradigm to
      Understand Learning from Human Preferences", Sec. 5), regressing ``h`` to a finite
      target instead of pushing it to infinity. IPO's ``beta`` is the paper's ``tau``; the
      log-probs may be sums or token means (a choice of the caller).

    The loss is the mean over pairs; at ``pi == pi_ref`` it is ``log 2`` (sigmoid) and
    ``1 / (4 beta^2)`` (ipo). Shapes: four ``[B]`` tensors -> (0-dim loss, :class:`DPOStats`).

    Raises:
        ValueError: for an unknown ``loss_type``, ``beta <= 0``, ``label_smoothing`` outside
            ``[0, 0.5)``, or ``label_smoothing`` with ``"ipo"``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(
            f"unknown DPO loss_type {loss_type!r}; valid names: {', '.join(DPO_LOSS_TYPES)}"
        )
    if beta <= 0 or not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"need beta > 0 and 0 <= label_smoothing < 0.5, got {beta=} {label_smoothing=}"
        )
    if loss_type == "ipo" and label_smoothing != 0.0:
        raise ValueError("label_smoothing (cDPO) applies to the sigmoid loss only")
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        eps = label_smoothing
        losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2

    with torch.no_grad():
        chosen_rewards = beta * chosen_logratio
        rejected_rewards = beta * rejected_logratio
        stats = DPOStats(
            chosen_rewards=chosen_rewards,
            rejected_rewards=rejected_rewards,
            reward_accuracy=(chosen_rewards > rejected_rewards).to(h.dtype).mean(),
            reward_margin=(chosen_rewards - rejected_rewards).mean(),
        )
    return losses.mean(), stats


def bradley_terry_loss(
    r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Pairwise reward-model loss under the Bradley-Terry model (Bradley & Terry 1952;
    Ouyang et al. 2022, Eq. 1), with the optional margin of Touvron et al. 2023 (Llama 2).

    ``L = mean(-log sigmoid(r_w - r_l - margin))`` (``margin = 0`` if None). Returns the loss
    and the detached pairwise accuracy ``mean(1[r_w > r_l])`` (margin not included).
    Shapes: ``r_chosen``, ``r_rejected``, ``margin`` ``[B]`` -> (0-dim, 0-dim).
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    accuracy = (r_chosen > r_rejected).to(diff.dtype).mean().detach()
    return -F.logsigmoid(diff).mean(), accuracy
