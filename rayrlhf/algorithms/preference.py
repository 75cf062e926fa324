"""Preference losses: DPO and its offline family (IPO, cDPO, KTO, ORPO, SimPO), and Bradley-Terry.

Convention: a batch of ``B`` preference pairs (for KTO, ``B`` unpaired rows); ``*_logps`` are
sequence log-probabilities ``[B]`` (the sum of the response's token log-probs, see
:func:`sequence_logps`) under the policy being trained and the frozen reference model, and
``*_avg_logps`` are the same divided by the response's token count (ORPO and SimPO are
length-normalised). Each loss is the mean over the batch and comes with a
:class:`PreferenceStats` of its own implicit reward.

`PREFERENCE_LOSSES` maps the names declared in `rayrlhf.config.PreferenceLossName` to these
functions through one signature, ``(PreferenceScores, LossParams) -> (loss, stats)``, and says
which of them read a reference model and which read unpaired (KTO) rows.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from rayrlhf.algorithms.masked import masked_mean, masked_sum
from rayrlhf.algorithms.registry import check_names, lookup
from rayrlhf.config import PreferenceLossName

# ORPO's odds P / (1 - P) are infinite at P = 1; a length-normalised likelihood that close to 1
# (mean token log-prob above -1e-6) is clamped there, where log(1 - P) is about -13.8.
_MAX_AVG_LOGP = -1e-6


@dataclass(frozen=True)
class PreferenceStats:
    """Diagnostics of a preference loss, all detached 0-dim tensors.

    The rewards are the loss's own: ``beta * (log pi - log pi_ref)`` for DPO, IPO, cDPO and KTO,
    ``beta * avg log pi`` for SimPO, the log-odds ``log(P / (1 - P))`` of the length-normalised
    likelihood ``P`` for ORPO.
    """

    reward_accuracy: Tensor
    """Pairs: fraction with chosen reward > rejected (ties are not wins). KTO: fraction of rows
    on their label's side of the reference point z0 (desirable above, undesirable below)."""
    chosen_reward: Tensor
    """Mean reward of the chosen (KTO: desirable) responses."""
    rejected_reward: Tensor
    """Mean reward of the rejected (KTO: undesirable) responses."""
    margin: Tensor
    """Pairs: mean of chosen minus rejected reward. KTO: chosen_reward - rejected_reward."""
    nll: Tensor | None = None
    """ORPO: its SFT term, the mean over pairs of the chosen response's per-token NLL."""
    kl: Tensor | None = None
    """KTO: the reference point z0 the loss used."""


def sequence_logps(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Sequence log-probability ``log pi(y|x) = sum_t m_t log pi(y_t | x, y_<t)``.

    Garbage at masked positions is ignored; an all-zero mask gives 0. Shapes:
    ``token_logprobs``, ``mask`` ``[B, T]`` -> ``[B]``.
    """
    return masked_sum(token_logprobs, mask, dim=1)


def _pair_stats(chosen_rewards: Tensor, rejected_rewards: Tensor, **extra) -> PreferenceStats:
    """Stats of per-pair rewards ``[B]``, ``[B]``."""
    with torch.no_grad():
        c, r = chosen_rewards.detach(), rejected_rewards.detach()
        return PreferenceStats(
            reward_accuracy=(c > r).to(c.dtype).mean(),
            chosen_reward=c.mean(),
            rejected_reward=r.mean(),
            margin=(c - r).mean(),
            **extra,
        )


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, PreferenceStats]:
    """Direct Preference Optimization, and conservative DPO with ``label_smoothing`` > 0.

    With ``h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l))`` per pair the
    loss is ``-log sigmoid(beta * h)`` (Rafailov et al. 2023, Eq. 7). With ``label_smoothing =
    eps`` > 0 it is cDPO (Mitchell 2023, "A note on DPO with noisy preferences"), which assumes
    labels are flipped with probability ``eps``:
    ``-(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)``.
    At ``pi == pi_ref`` the loss is ``log 2``. Shapes: four ``[B]`` tensors -> (0-dim, stats).

    Raises:
        ValueError: for ``beta <= 0`` or ``label_smoothing`` outside ``[0, 0.5)``.
    """
    if beta <= 0 or not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"need beta > 0 and 0 <= label_smoothing < 0.5, got {beta=} {label_smoothing=}"
        )
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    h, eps = chosen - rejected, label_smoothing
    losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    return losses.mean(), _pair_stats(beta * chosen, beta * rejected)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    tau: float,
) -> tuple[Tensor, PreferenceStats]:
    """IPO: ``(h - 1/(2 tau))^2`` with DPO's ``h`` (Azar et al. 2023, "A General Theoretical
    Paradigm to Understand Learning from Human Preferences", Sec. 5).

    It regresses ``h`` to a finite target instead of pushing it to infinity; at
    ``pi == pi_ref`` the loss is ``1 / (4 tau^2)``. The log-probs may be sums or token means
    (the caller's choice). Rewards are ``tau * log-ratio``. Shapes: four ``[B]`` -> (0-dim,
    stats).
    """
    if tau <= 0:
        raise ValueError(f"need tau > 0, got {tau=}")
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    losses = (chosen - rejected - 1.0 / (2.0 * tau)) ** 2
    return losses.mean(), _pair_stats(tau * chosen, tau * rejected)


def simpo_loss(
    chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, beta: float, gamma: float
) -> tuple[Tensor, PreferenceStats]:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", Eq. 6): ``-log sigmoid(beta * avg log pi(y_w) - beta * avg log pi(y_l) - gamma)``.

    The reward is the length-normalised log-likelihood ``beta / |y| * log pi(y|x)`` (Eq. 4), so
    no reference model is needed; ``gamma`` is the target reward margin, in reward units (the
    paper tunes ``gamma / beta`` around 0.5 with ``beta`` 2 to 2.5). Shapes: ``[B]``, ``[B]``
    (per-token mean log-probs) -> (0-dim, stats).
    """
    if beta <= 0:
        raise ValueError(f"need beta > 0, got {beta=}")
    chosen, rejected = beta * chosen_avg_logps, beta * rejected_avg_logps
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return losses.mean(), _pair_stats(chosen, rejected)


def _log_odds(avg_logps: Tensor) -> Tensor:
    """``log(P / (1 - P))`` for ``log P = avg_logps <= 0``, with a stable ``log(1 - P)``
    (Maechler 2012, "Accurately computing log(1 - exp(-|a|))")."""
    x = avg_logps.clamp(max=_MAX_AVG_LOGP)
    log1m = torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return x - log1m


def orpo_loss(
    chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, lam: float
) -> tuple[Tensor, PreferenceStats]:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", Eqs. 6-7): ``L_SFT + lam * L_OR`` with ``L_OR = -log sigmoid(log(odds(y_w) /
    odds(y_l)))``.

    ``odds(y) = P / (1 - P)`` (Eq. 4) on the length-normalised likelihood
    ``log P = avg log pi(y|x)``, and ``L_SFT = -avg log pi(y_w|x)``: the chosen response's
    per-token NLL, here from the same forward pass, averaged over pairs. No reference model.
    Rewards are the log-odds; ``nll`` is ``L_SFT``. Shapes: ``[B]``, ``[B]`` (per-token mean
    log-probs) -> (0-dim, stats).
    """
    if lam < 0:
        raise ValueError(f"need lam >= 0, got {lam=}")
    chosen, rejected = _log_odds(chosen_avg_logps), _log_odds(rejected_avg_logps)
    nll = -chosen_avg_logps.mean()
    loss = nll - lam * F.logsigmoid(chosen - rejected).mean()
    return loss, _pair_stats(chosen, rejected, nll=nll.detach())


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, PreferenceStats]:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    Sec. 4.1): ``L = mean(lambda_y - v(x, y))`` over unpaired rows, with
    ``r = log pi(y|x) - log pi_ref(y|x)`` and reference point ``z0``:

    * desirable ``y``:   ``v = lambda_D * sigmoid(beta * (r - z0))``
    * undesirable ``y``: ``v = lambda_U * sigmoid(beta * (z0 - r))``

    ``z0 = max(0, kl)``, detached (the paper does not backpropagate through it). ``kl`` is the
    paper's estimate of ``KL(pi || pi_ref)``: the mean of ``r`` over *mismatched* rows, each
    prompt with another row's completion (:func:`kto_kl_estimate`), taken over the micro-batch
    and averaged over ranks, as TRL's KTOTrainer does. At ``pi == pi_ref`` the loss is
    ``(lambda_D n_D + lambda_U n_U) / (2 B)``. Rewards are ``beta * r``. Shapes:
    ``policy_logps``, ``ref_logps`` ``[B]``, ``desirable`` ``[B]`` bool, ``kl`` 0-dim ->
    (0-dim, stats).
    """
    if beta <= 0 or desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"need beta > 0 and weights >= 0, got {beta=}")
    z0 = kl.detach().clamp(min=0)
    r = policy_logps - ref_logps
    good = desirable.bool()
    losses = torch.where(
        good,
        desirable_weight * torch.sigmoid(-beta * (r - z0)),  # lambda_D (1 - sigmoid(beta(r-z0)))
        undesirable_weight * torch.sigmoid(-beta * (z0 - r)),
    )
    with torch.no_grad():
        rewards = beta * r.detach()
        chosen, rejected = masked_mean(rewards, good), masked_mean(rewards, ~good)
        stats = PreferenceStats(
            reward_accuracy=((r.detach() > z0) == good).to(r.dtype).mean(),
            chosen_reward=chosen,
            rejected_reward=rejected,
            margin=chosen - rejected,
            kl=z0,
        )
    return losses.mean(), stats


def kto_kl_estimate(policy_mismatched_logps: Tensor, ref_mismatched_logps: Tensor) -> Tensor:
    """KTO's KL estimate: ``mean(log pi(y'|x) - log pi_ref(y'|x))`` over mismatched rows
    (``y'`` another row's completion), detached (Ethayarajh et al. 2024, Sec. 4.1); may be
    negative (:func:`kto_loss` clamps it). Shapes: ``[B]``, ``[B]`` -> 0-dim."""
    return (policy_mismatched_logps - ref_mismatched_logps).detach().mean()


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


# ---- one signature for the trainer ---------------------------------------------------------


@dataclass(frozen=True)
class PreferenceScores:
    """What any preference loss reads about ``B`` rows: the policy's sequence log-probs of both
    sides (one forward pass), their lengths and, where the loss uses them, the reference's.

    For KTO's unpaired rows, ``chosen`` is each row's own completion and ``rejected`` its
    mismatched completion (another row's, on this row's prompt), which estimates the KL.
    """

    chosen: Tensor
    """[B] policy log pi of the chosen response (KTO: the row's completion)."""
    rejected: Tensor
    """[B] policy log pi of the rejected response (KTO: the mismatched completion)."""
    chosen_tokens: Tensor
    """[B] float: tokens in the chosen response (EOS included); ORPO and SimPO divide by it."""
    rejected_tokens: Tensor
    """[B] float: tokens in the rejected response."""
    ref_chosen: Tensor | None = None
    """[B] reference log-probs of `chosen`; None for the reference-free losses."""
    ref_rejected: Tensor | None = None
    """[B] reference log-probs of `rejected`."""
    desirable: Tensor | None = None
    """KTO: [B] bool, True for a desirable completion."""
    kl: Tensor | None = None
    """KTO: a KL estimate over more rows than these (e.g. all ranks'); None estimates it from
    these rows' mismatched completions."""


@dataclass(frozen=True)
class LossParams:
    """The hyper-parameters of every preference loss, each reading its own: ``beta`` is DPO,
    cDPO, KTO and SimPO's beta, IPO's tau and ORPO's lambda; ``label_smoothing`` cDPO's flip
    probability; ``simpo_gamma`` SimPO's target margin; ``desirable_weight`` and
    ``undesirable_weight`` KTO's lambda_D and lambda_U. (`rayrlhf.recipes.dpo.DPOConfig`
    documents the settings and holds their defaults.)"""

    beta: float
    label_smoothing: float
    simpo_gamma: float
    desirable_weight: float
    undesirable_weight: float


@dataclass(frozen=True)
class PreferenceLoss:
    """A registry entry: the loss on `PreferenceScores`, and what it needs."""

    fn: Callable[[PreferenceScores, LossParams], tuple[Tensor, PreferenceStats]]
    uses_reference: bool
    """Reads reference log-probs (else the trainer starts no reference actor)."""
    unpaired: bool = False
    """Reads KTO rows {prompt, completion, label} instead of pairs."""


def avg_logps(logps: Tensor, tokens: Tensor) -> Tensor:
    """Length-normalised log-likelihood ``log pi(y|x) / |y|``; ``[B]``, ``[B]`` -> ``[B]``."""
    return logps / tokens.clamp(min=1)


def _dpo(s: PreferenceScores, p: LossParams) -> tuple[Tensor, PreferenceStats]:
    return dpo_loss(s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, p.beta)


def _cdpo(s: PreferenceScores, p: LossParams) -> tuple[Tensor, PreferenceStats]:
    return dpo_loss(s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, p.beta, p.label_smoothing)


def _ipo(s: PreferenceScores, p: LossParams) -> tuple[Tensor, PreferenceStats]:
    return ipo_loss(s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, p.beta)


def _kto(s: PreferenceScores, p: LossParams) -> tuple[Tensor, PreferenceStats]:
    kl = s.kl if s.kl is not None else kto_kl_estimate(s.rejected, s.ref_rejected)
    w_d, w_u = p.desirable_weight, p.undesirable_weight
    return kto_loss(s.chosen, s.ref_chosen, s.desirable, kl, p.beta, w_d, w_u)


def _averages(s: PreferenceScores) -> tuple[Tensor, Tensor]:
    return avg_logps(s.chosen, s.chosen_tokens), avg_logps(s.rejected, s.rejected_tokens)


def _orpo(s: PreferenceScores, p: LossParams) -> tuple[Tensor, PreferenceStats]:
    return orpo_loss(*_averages(s), p.beta)


def _simpo(s: PreferenceScores, p: LossParams) -> tuple[Tensor, PreferenceStats]:
    return simpo_loss(*_averages(s), p.beta, p.simpo_gamma)


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = check_names(
    {
        "dpo": PreferenceLoss(_dpo, uses_reference=True),
        "ipo": PreferenceLoss(_ipo, uses_reference=True),
        "cdpo": PreferenceLoss(_cdpo, uses_reference=True),
        "kto": PreferenceLoss(_kto, uses_reference=True, unpaired=True),
        "orpo": PreferenceLoss(_orpo, uses_reference=False),
        "simpo": PreferenceLoss(_simpo, uses_reference=False),
    },
    get_args(PreferenceLossName),
    "preference loss",
)


def preference_loss_entry(name: str) -> PreferenceLoss:
    """``PREFERENCE_LOSSES[name]``; an unknown name is a ``ValueError`` listing the valid ones."""
    return lookup(PREFERENCE_LOSSES, name, "preference loss")
