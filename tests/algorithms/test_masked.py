import math

import torch

from rayrlhf.algorithms.masked import masked_mean, masked_sum, masked_var, masked_whiten

X = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
MASK = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float32)


def test_masked_sum_and_mean_by_hand():
    assert masked_sum(X, MASK).item() == 2 + 3 + 10 + 20 + 30 + 40
    assert torch.equal(masked_sum(X, MASK, dim=1), torch.tensor([5.0, 100.0]))
    assert masked_mean(X, MASK).item() == 105 / 6
    assert torch.equal(masked_mean(X, MASK, dim=1), torch.tensor([2.5, 25.0]))
    assert torch.equal(masked_mean(X, MASK.bool(), dim=0), torch.tensor([10.0, 11.0, 16.5, 40.0]))


def test_masked_var_matches_selected_elements():
    selected = torch.tensor([2.0, 3.0, 10.0, 20.0, 30.0, 40.0])
    mean = sum(selected.tolist()) / 6
    ss = sum((v - mean) ** 2 for v in selected.tolist())
    assert math.isclose(masked_var(X, MASK).item(), ss / 6, rel_tol=1e-6)
    assert math.isclose(masked_var(X, MASK, unbiased=True).item(), ss / 5, rel_tol=1e-6)


def test_garbage_at_masked_positions_does_not_leak():
    x = X.clone()
    x[0, 0] = float("nan")
    x[0, 3] = float("inf")
    assert masked_sum(x, MASK).item() == 105
    assert torch.isfinite(masked_var(x, MASK))
    assert torch.isfinite(masked_whiten(x, MASK)).all()


def test_empty_mask_gives_zero_not_nan():
    zero = torch.zeros_like(MASK)
    assert masked_mean(X, zero).item() == 0.0
    assert torch.equal(masked_mean(X, zero, dim=1), torch.zeros(2))
    assert masked_var(X, zero, unbiased=True).item() == 0.0
    out = masked_whiten(X, zero)
    assert torch.equal(out, torch.zeros_like(X))
    # One valid token: unbiased variance denominator N-1 = 0 must be guarded too.
    one = torch.zeros_like(MASK)
    one[1, 2] = 1
    assert masked_var(X, one, unbiased=True).item() == 0.0


def test_masked_whiten_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=g, dtype=torch.float64) * 3.0 + 5.0
    mask = torch.zeros(8, 16)
    for i in range(8):
        mask[i, i : i + 6] = 1  # contiguous responses at varying offsets
    out = masked_whiten(x, mask)
    vals = out[mask.bool()]
    assert abs(vals.mean().item()) < 1e-6
    assert abs(vals.std(unbiased=False).item() - 1.0) < 1e-6
    assert torch.all(out[~mask.bool()] == 0)

    scaled = masked_whiten(x, mask, shift_mean=False)
    orig_mean = x[mask.bool()].mean().item()
    assert abs(scaled[mask.bool()].mean().item() - orig_mean) < 1e-6
    assert abs(scaled[mask.bool()].std(unbiased=False).item() - 1.0) < 1e-6
    assert torch.all(scaled[~mask.bool()] == 0)
