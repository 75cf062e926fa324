import math

import pytest
import torch

from rayrlhf.algorithms.rewards import RunningMoments, clip_rewards


def test_clip_rewards():
    assert clip_rewards(torch.tensor([-3.0, 0.5, 2.0, -1.0]), 1.0).tolist() == [
        -1.0,
        0.5,
        1.0,
        -1.0,
    ]
    with pytest.raises(ValueError):
        clip_rewards(torch.zeros(2), 0.0)


def test_running_moments_hand_case():
    rm = RunningMoments()
    rm.update(torch.tensor([1.0, 2.0]))
    rm.update(torch.tensor([3.0, 4.0, 10.0]))
    # stream 1, 2, 3, 4, 10: mean 4; squared deviations 9 + 4 + 1 + 0 + 36 = 50; 50 / 4 = 12.5
    assert rm.count == 5
    assert rm.mean == pytest.approx(4.0)
    assert rm.var == pytest.approx(12.5)
    assert rm.std == pytest.approx(math.sqrt(12.5))
    # (10 - 4) / sqrt(12.5) = 1.697056; scale only: 10 / 3.535534 = 2.828427
    assert rm.normalize(torch.tensor([10.0])).item() == pytest.approx(1.697056, abs=1e-6)
    assert rm.normalize(torch.tensor([10.0]), shift_mean=False).item() == pytest.approx(
        2.828427, abs=1e-6
    )


def test_running_moments_equals_concatenated_stream():
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(size, generator=g, dtype=torch.float64) * 3 + 100
        for size in (5, 1, 0, 17, 2, 64)
    ]
    batches.append(torch.randn(3, 4, generator=g, dtype=torch.float64))  # any shape
    rm = RunningMoments()
    for b in batches:
        rm.update(b)
    stream = torch.cat([b.reshape(-1) for b in batches])
    assert rm.count == stream.numel()
    assert rm.mean == pytest.approx(stream.mean().item(), rel=1e-12)
    assert rm.var == pytest.approx(stream.var().item(), rel=1e-10)  # unbiased, as torch.var
    assert rm.std == pytest.approx(stream.std().item(), rel=1e-10)
    torch.testing.assert_close(rm.normalize(stream), (stream - stream.mean()) / stream.std())


def test_running_moments_degenerate_streams_stay_finite():
    rm = RunningMoments()
    assert rm.var == 0.0
    rm.update(torch.tensor([5.0]))
    assert rm.var == 0.0
    # one element: scale 1, mean removed
    assert rm.normalize(torch.tensor([7.0])).tolist() == [2.0]
    rm.update(torch.tensor([5.0, 5.0]))
    assert torch.isfinite(rm.normalize(torch.tensor([9.0]))).all()
