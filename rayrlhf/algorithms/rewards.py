"""Sequence-reward post-processing: clipping and running reward normalisation.

Convention: rewards are sequence-level scores ``[B]`` (any shape works for these functions);
they are applied before the advantage estimators.
"""

import math

from torch import Tensor


def clip_rewards(rewards: Tensor, bound: float) -> Tensor:
    """Clip rewards to ``[-bound, bound]`` (bounds reward-model outliers; cf. Mnih et al. 2015,
    whose Atari agents clip rewards to ``[-1, 1]``). Shapes: any -> same.

    Raises:
        ValueError: if ``bound <= 0``.
    """
    if bound <= 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    return rewards.clamp(-bound, bound)


class RunningMoments:
    """Running mean and variance of a reward stream, for running reward normalisation.

    Each :meth:`update` merges a batch's count, mean and sum of squared deviations ``M2`` into
    the totals with the parallel form of Welford's algorithm (Chan, Golub & LeVeque 1979)::

        delta = mean_b - mean;  N' = N + N_b;  mean' = mean + delta * N_b / N'
        M2' = M2 + M2_b + delta^2 * N * N_b / N'

    which is numerically stable and equals the statistics of the concatenated stream. ``var``
    is the unbiased (Bessel) variance ``M2 / (N - 1)``, as ``torch.var``. State is three Python
    floats in float64 (``count``, ``mean``, ``m2``), so it can be saved and restored by value.
    """

    def __init__(self) -> None:
        self.count: int = 0
        self.mean: float = 0.0
        self.m2: float = 0.0

    def update(self, x: Tensor) -> None:
        """Add every element of ``x`` (any shape; an empty tensor is a no-op) to the stream."""
        x = x.detach().double().reshape(-1)
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b = x.mean().item()
        m2_b = (x - mean_b).pow(2).sum().item()
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta * delta * self.count * n_b / total
        self.count = total

    @property
    def var(self) -> float:
        """Unbiased variance of the stream so far; 0.0 before two elements."""
        return self.m2 / (self.count - 1) if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        """Unbiased standard deviation ``sqrt(var)``."""
        return math.sqrt(self.var)

    def normalize(self, x: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
        """``(x - mean) / std`` with the running statistics (``x / std`` if not ``shift_mean``).

        While ``std <= eps`` (fewer than two elements seen, or a constant stream) the scale is
        1, so the result stays finite. Shapes: any -> same, in ``x``'s dtype.
        """
        scale = self.std if self.std > eps else 1.0
        shift = self.mean if shift_mean else 0.0
        return (x - shift) / scale
