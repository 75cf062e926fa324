"""Masked reductions over token tensors.

Convention: ``x`` and ``mask`` are ``[B, T]`` (or broadcastable); ``mask`` is float or bool and
any non-zero entry marks a valid (action) token. All denominators are guarded so that an
all-zero mask gives 0, never NaN.
"""

import torch
from torch import Tensor


def _zero_masked(x: Tensor, mask: Tensor) -> Tensor:
    """Return ``x`` with masked-out positions set to exactly 0.

    ``torch.where`` rather than ``x * mask`` because ``0 * inf`` and ``0 * nan`` are NaN, and
    padding positions may hold garbage (e.g. logprobs of pad tokens).
    """
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def _count(x: Tensor, mask: Tensor, dim: int | None) -> Tensor:
    """Number of valid tokens (``sum m``), as ``x``'s dtype, clamped to >= 1."""
    m = mask.bool().expand_as(x).to(x.dtype)
    n = m.sum() if dim is None else m.sum(dim=dim)
    return n.clamp(min=1)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum over valid tokens: ``sum_t m_t * x_t``.

    Shapes: ``x`` ``[B, T]``, ``mask`` ``[B, T]``. ``dim=None`` -> 0-dim tensor, otherwise the
    reduction over ``dim`` (e.g. ``[B]`` for ``dim=1``).
    """
    xm = _zero_masked(x, mask)
    return xm.sum() if dim is None else xm.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over valid tokens: ``sum_t m_t x_t / max(1, sum_t m_t)``.

    Shapes: ``x`` ``[B, T]``, ``mask`` ``[B, T]``. ``dim=None`` is the global (token-level)
    mean over every valid token of the batch -> 0-dim; ``dim=1`` gives per-row means ``[B]``.
    The clamp makes an empty selection return 0 instead of NaN.
    """
    return masked_sum(x, mask, dim) / _count(x, mask, dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = False) -> Tensor:
    """Global variance over valid tokens.

    ``mu = masked_mean(x)``, ``Var = sum_t m_t (x_t - mu)^2 / D`` with ``D = N`` (population)
    or ``D = N - 1`` (``unbiased``, Bessel), ``N = sum m``; ``D`` is clamped to >= 1 so a
    mask with 0 or 1 valid token gives 0. Shapes: ``x``, ``mask`` ``[B, T]`` -> 0-dim.
    """
    mean = masked_mean(x, mask)
    sq_dev = masked_sum((x - mean) ** 2, mask)
    n = mask.bool().expand_as(x).to(x.dtype).sum()
    denom = n - 1 if unbiased else n
    return sq_dev / denom.clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` with global masked statistics.

    ``y = (x - mu) / sqrt(Var + eps)`` with ``mu``/``Var`` from :func:`masked_mean` /
    :func:`masked_var` (population variance, so valid tokens of ``y`` have std ~1). With
    ``shift_mean=False`` the mean is added back: ``y = (x - mu) / sqrt(Var + eps) + mu``
    (scale only). Masked positions of the result are exactly 0. Shapes: ``[B, T]`` -> ``[B, T]``.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_masked(whitened, mask)
