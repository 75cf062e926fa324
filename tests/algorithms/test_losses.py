import math

import pytest
import torch

from rayrlhf.algorithms.losses import (
    AGGREGATIONS,
    Aggregation,
    PolicyLossStats,
    aggregate,
    engine_logprob_gap_limit,
    entropy_bonus,
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    ppo_policy_loss,
    value_loss,
)
from rayrlhf.types import LossNorm


def test_vanilla_policy_gradient_when_ratio_is_one():
    g = torch.Generator().manual_seed(0)
    logprobs = (-torch.rand(3, 5, generator=g, dtype=torch.float64)).requires_grad_()
    old = logprobs.detach().clone()
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.float64)
    n_tokens = 10

    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    assert isinstance(stats, PolicyLossStats)
    assert loss.item() == pytest.approx(-(adv * mask).sum().item() / n_tokens)
    assert stats.approx_kl.item() == 0.0
    assert stats.clipfrac.item() == 0.0
    assert stats.approx_kl.dim() == 0 and not stats.approx_kl.requires_grad

    loss.backward()
    torch.testing.assert_close(logprobs.grad, -adv * mask / n_tokens)


def test_clipped_branch_for_positive_and_negative_advantages():
    ratios = [1.5, 0.5, 0.5, 1.5, 1.0]
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    logprobs = torch.tensor([[math.log(x) for x in ratios]], dtype=torch.float64)
    logprobs.requires_grad_()
    old = torch.zeros(1, 5, dtype=torch.float64)
    old[0, 4] = -1e4  # garbage on padding: exp(1e4) would be inf without masking

    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    # token 0: A=+1, r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped, no gradient)
    # token 1: A=-1, r=0.5 -> max( 0.5,  0.8) =  0.8 (clipped, no gradient)
    # token 2: A=+1, r=0.5 -> max(-0.5, -0.8) = -0.5 (unclipped, d/dlogp = -A*r = -0.5)
    # token 3: A=-1, r=1.5 -> max( 1.5,  1.2) =  1.5 (unclipped, d/dlogp = -A*r = +1.5)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.5 + 1.5) / 4)
    assert stats.clipfrac.item() == pytest.approx(0.5)
    # (r - 1) - ln r: r=1.5 -> 0.5 - 0.405465 = 0.094535; r=0.5 -> -0.5 + 0.693147 = 0.193147
    assert stats.approx_kl.item() == pytest.approx((0.094535 + 0.193147) / 2, abs=1e-6)

    loss.backward()
    expected = torch.tensor([[0.0, 0.0, -0.5 / 4, 1.5 / 4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logprobs.grad, expected)


VALUES = torch.tensor([[1.0, 2.0, 0.0, 2.0, 9.0]], dtype=torch.float64)
OLD_VALUES = torch.tensor([[1.5, 1.0, 0.0, 1.0, -4.0]], dtype=torch.float64)
RETURNS = torch.tensor([[0.0, 2.5, 1.0, 1.0, 7.0]], dtype=torch.float64)
V_MASK = torch.tensor([[1, 1, 1, 1, 0]])


def test_value_loss_unclipped():
    # squared errors 1.0, 0.25, 1.0, 1.0 -> 0.5 * 3.25 / 4
    loss, clipfrac = value_loss(VALUES, OLD_VALUES, RETURNS, V_MASK, clip_eps=None)
    assert loss.item() == pytest.approx(0.40625)
    assert clipfrac.item() == 0.0


def test_value_loss_clipped():
    # V_clip = old + clip(V - old, +-0.2) = 1.3, 1.2, 0.0, 1.2
    # clipped errors 1.69, 1.69, 1.0, 0.04 vs unclipped 1.0, 0.25, 1.0, 1.0
    # max -> 1.69, 1.69, 1.0 (tie: not counted as clipped), 1.0
    loss, clipfrac = value_loss(VALUES, OLD_VALUES, RETURNS, V_MASK, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5 * 5.38 / 4)
    assert clipfrac.item() == pytest.approx(0.5)


def test_value_loss_gradient_zero_where_clipped():
    values = VALUES.clone().requires_grad_()
    loss, _ = value_loss(values, OLD_VALUES, RETURNS, V_MASK, clip_eps=0.2)
    loss.backward()
    # unclipped tokens: d/dV 0.5 * (V - R)^2 / 4 = (V - R) / 4
    expected = torch.tensor([[0.0, 0.0, -1.0 / 4, 1.0 / 4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(values.grad, expected)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_value_loss_gradient_finite_with_garbage_on_padding(clip_eps, bad):
    # Position 4 is padding: whatever it holds must change neither the loss nor any gradient.
    clean, _ = value_loss(VALUES, OLD_VALUES, RETURNS, V_MASK, clip_eps)
    for field in range(3):
        tensors = [VALUES.clone(), OLD_VALUES.clone(), RETURNS.clone()]
        tensors[field][0, 4] = bad
        values = tensors[0].requires_grad_()
        loss, _ = value_loss(values, tensors[1], tensors[2], V_MASK, clip_eps)
        loss.backward()
        assert loss.item() == pytest.approx(clean.item()), field
        assert torch.isfinite(values.grad).all(), (field, values.grad)
        assert values.grad[0, 4] == 0


def test_entropy():
    uniform = entropy_from_logits(torch.zeros(2, 3, 7))
    assert uniform.shape == (2, 3)
    assert torch.allclose(uniform, torch.full((2, 3), math.log(7)))
    # constant shift does not matter, and large logits do not overflow
    shifted = entropy_from_logits(torch.full((1, 1, 5), 500.0))
    assert torch.allclose(shifted, torch.tensor(math.log(5)))
    # p = (1/2, 1/4, 1/4): H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2
    logits = torch.tensor([[[math.log(0.5), math.log(0.25), math.log(0.25)]]])
    assert entropy_from_logits(logits).item() == pytest.approx(1.5 * math.log(2), rel=1e-6)
    peaked = entropy_from_logits(torch.tensor([[[1000.0, 0.0, 0.0]]]))
    assert torch.isfinite(peaked).all() and peaked.item() == pytest.approx(0.0, abs=1e-6)


def test_logprobs_from_logits_matches_manual_softmax():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (2, 4), generator=g)
    out = logprobs_from_logits(logits, labels)
    for b in range(2):
        for t in range(4):
            row = [math.exp(z) for z in logits[b, t].tolist()]
            manual = math.log(row[labels[b, t]] / sum(row))
            assert out[b, t].item() == pytest.approx(manual, rel=1e-9)


def test_logprobs_from_logits_upcasts_half_precision():
    logits = torch.randn(1, 3, 50).to(torch.bfloat16)
    labels = torch.tensor([[0, 7, 49]])
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, logprobs_from_logits(logits.float(), labels))


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 4.0, 8.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    mean = torch.full_like(returns, (1.0 + 2.0 + 4.0 + 8.0) / 4)
    assert explained_variance(mean, returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    # constant returns: variance 0, defined as 0.0 and never NaN
    const = torch.full((2, 4), 3.7)
    ev = explained_variance(torch.randn(2, 4), const, torch.ones(2, 4))
    assert ev.dim() == 0 and ev.item() == 0.0
    assert explained_variance(returns, returns, torch.zeros(1, 5)).item() == 0.0


def test_dual_clip_bounds_negative_advantage_with_large_ratio():
    ratios = [5.0, 2.0, 5.0, 0.5, 1.0]
    adv = torch.tensor([[-1.0, -1.0, 1.0, -1.0, -7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    logprobs = torch.tensor([[math.log(x) for x in ratios]], dtype=torch.float64)
    logprobs.requires_grad_()
    old = torch.zeros(1, 5, dtype=torch.float64)
    old[0, 4] = -1e4  # garbage on padding

    # eps 0.2, c 3:
    # token 0: A=-1, r=5 -> max(5, 1.2) = 5 -> min(5, 3) = 3 (dual clip, no gradient)
    # token 1: A=-1, r=2 -> max(2, 1.2) = 2 -> min(2, 3) = 2 (unclipped, d/dlogp = -A*r = 2)
    # token 2: A=+1, r=5 -> max(-5, -1.2) = -1.2 (PPO clip; dual clip is for A < 0 only)
    # token 3: A=-1, r=0.5 -> max(0.5, 0.8) = 0.8 -> min(0.8, 3) = 0.8 (PPO clip)
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx((3.0 + 2.0 - 1.2 + 0.8) / 4)
    assert stats.clipfrac.item() == pytest.approx(0.5)
    assert stats.dual_clipfrac.item() == pytest.approx(0.25)
    loss.backward()
    expected = torch.tensor([[0.0, 2.0 / 4, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logprobs.grad, expected)

    # Without dual clip token 0 costs 5 and has gradient -A*r = 5.
    plain, plain_stats = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    assert plain.item() == pytest.approx((5.0 + 2.0 - 1.2 + 0.8) / 4)
    assert plain_stats.dual_clipfrac.item() == 0.0
    with pytest.raises(ValueError):
        ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2, dual_clip=1.0)


# Row 0: 3 valid tokens (1, 2, 3) and garbage; row 1: one token (4); row 2: no valid token.
PER_TOKEN = torch.tensor(
    [[1.0, 2.0, 3.0, float("nan")], [4.0, 50.0, 60.0, 70.0], [8.0, 8.0, 8.0, 8.0]],
    dtype=torch.float64,
)
AGG_MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


def test_aggregation_modes_hand_case():
    # token mean (1 + 2 + 3 + 4) / 4 = 2.5; with a global count of 8 tokens: 10 / 8 = 1.25.
    # Each mode reads only the LossNorm counts it divides by; the 99s are never read.
    assert aggregate(PER_TOKEN, AGG_MASK).item() == 2.5
    assert aggregate(PER_TOKEN, AGG_MASK, Aggregation(norm=LossNorm(8, 99, 99))).item() == 1.25
    # per-sequence means (2, 4), the empty row is not a sequence: 3; global 4 sequences: 1.5
    seq_mean = Aggregation("seq_mean_token_mean")
    assert aggregate(PER_TOKEN, AGG_MASK, seq_mean).item() == 3.0
    seq_mean_global = Aggregation("seq_mean_token_mean", LossNorm(99, 4, 99))
    assert aggregate(PER_TOKEN, AGG_MASK, seq_mean_global).item() == 1.5
    # per-sequence sums (6, 4): 5; divided by max_len 4 first: (1.5 + 1) / 2 = 1.25
    assert aggregate(PER_TOKEN, AGG_MASK, Aggregation("seq_mean_token_sum")).item() == 5.0
    dr_grpo = Aggregation("seq_mean_token_sum", LossNorm(99, 2, 4))  # this batch's 2 sequences
    assert aggregate(PER_TOKEN, AGG_MASK, dr_grpo).item() == 1.25
    for mode in AGGREGATIONS:
        assert aggregate(PER_TOKEN, torch.zeros(3, 4), Aggregation(mode)).item() == 0.0  # not NaN


def test_aggregation_rejects_unknown_mode_and_bad_max_len():
    with pytest.raises(ValueError, match="token_mean, seq_mean_token_mean, seq_mean_token_sum"):
        Aggregation("mean")
    with pytest.raises(ValueError, match="max_len must be > 0"):
        Aggregation("seq_mean_token_sum", LossNorm(4, 2, 0))


def _split_batch():
    """12 right-padded rows, split 2 ranks x 3 micro-batches of very uneven token counts."""
    g = torch.Generator().manual_seed(0)
    lengths = [8, 7, 1, 2, 8, 3, 1, 1, 6, 8, 2, 5]
    x = torch.randn(12, 8, generator=g, dtype=torch.float64) + 1.0
    mask = (torch.arange(8).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    # rank 0: rows [0:3] (16 tokens), [3:4] (2), [4:6] (11);
    # rank 1: rows [6:8] (2 tokens), [8:11] (16), [11:12] (5)
    slices = [slice(0, 3), slice(3, 4), slice(4, 6), slice(6, 8), slice(8, 11), slice(11, 12)]
    return x, mask, slices


def _own_counts(mode: str, mask: torch.Tensor) -> Aggregation:
    """The aggregation of a batch taken alone: its own tokens and sequences, max_len 8."""
    tokens, seqs = mask.sum().item(), (mask.sum(1) > 0).sum().item()
    return Aggregation(mode, LossNorm(tokens=tokens, sequences=seqs, max_len=8))


@pytest.mark.parametrize("mode", list(AGGREGATIONS))
def test_micro_batch_partials_with_global_normaliser_sum_to_whole_batch(mode):
    x, mask, slices = _split_batch()
    whole = aggregate(x, mask, _own_counts(mode, mask))
    # What each rank would all-reduce before the step: total tokens (52) / sequences (12).
    step = Aggregation(mode, LossNorm(tokens=52, sequences=12, max_len=8))
    partials = [aggregate(x[s], mask[s], step) for s in slices]
    assert abs(sum(p.item() for p in partials) - whole.item()) < 1e-6
    # The naive alternative, averaging each micro-batch's own mean, gives a different number.
    naive = [aggregate(x[s], mask[s], _own_counts(mode, mask[s])).item() for s in slices]
    assert abs(sum(naive) / len(slices) - whole.item()) > 1e-2


def test_accumulated_policy_gradients_equal_whole_batch_gradients():
    x, mask, slices = _split_batch()
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(12, 8, generator=g, dtype=torch.float64)
    adv = torch.randn(12, 8, generator=g, dtype=torch.float64)
    logprobs = (old + 0.3 * x).requires_grad_()  # ratios exp(+-0.3 x): some tokens clip

    whole, _ = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2, dual_clip=3.0)
    (whole_grad,) = torch.autograd.grad(whole, logprobs)
    step = Aggregation("token_mean", LossNorm(tokens=52, sequences=12, max_len=8))
    total = 0.0
    for s in slices:
        part, _ = ppo_policy_loss(
            logprobs[s], old[s], adv[s], mask[s], 0.2, dual_clip=3.0, agg=step
        )
        part.backward()  # accumulates into logprobs.grad, as micro-batch steps do
        total += part.item()
    assert total == pytest.approx(whole.item(), abs=1e-9)
    torch.testing.assert_close(logprobs.grad, whole_grad)


def test_policy_loss_sequence_aggregation_hand_case():
    # ratio 1, so per-token loss is -A: rows (-1, -2) and (-3)
    adv = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    lp = torch.zeros(2, 3, dtype=torch.float64)
    loss, _ = ppo_policy_loss(lp, lp, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-6.0 / 3)  # token mean, the default
    loss, _ = ppo_policy_loss(lp, lp, adv, mask, 0.2, agg=Aggregation("seq_mean_token_mean"))
    assert loss.item() == pytest.approx(-(1.5 + 3.0) / 2)
    dr_grpo = Aggregation("seq_mean_token_sum", LossNorm(tokens=3, sequences=2, max_len=3))
    loss, _ = ppo_policy_loss(lp, lp, adv, mask, 0.2, agg=dr_grpo)
    assert loss.item() == pytest.approx(-(3.0 / 3 + 3.0 / 3) / 2)


def test_entropy_bonus_aggregates_and_keeps_gradient():
    entropy = torch.tensor([[1.0, 2.0, 3.0], [5.0, 7.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    bonus = entropy_bonus(entropy, mask)
    assert bonus.item() == pytest.approx((1.0 + 2.0 + 5.0) / 3)
    seq = entropy_bonus(entropy, mask, Aggregation("seq_mean_token_mean"))
    assert seq.item() == pytest.approx((1.5 + 5.0) / 2)
    bonus.backward()
    torch.testing.assert_close(entropy.grad, mask.float() / 3)


def _bf16_gap(hidden: int, layers: int, vocab: int) -> torch.Tensor:
    """|logprob in bf16 - logprob in fp32| of sampled-like tokens, same weights, same inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, vocab_size=vocab,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # logits as peaked as a trained model's
        ids = torch.randint(0, vocab, (8, 64))
        full = logprobs_from_logits(model(input_ids=ids).logits[:, :-1], ids[:, 1:])
        half = logprobs_from_logits(model.bfloat16()(input_ids=ids).logits[:, :-1], ids[:, 1:])
    return (full - half).abs()


@pytest.mark.slow  # a bf16 forward on CPU: ~15 s
def test_engine_logprob_gap_limits_are_calibrated_by_dtype():
    gap = _bf16_gap(384, 6, 8000)
    # A correct bf16 forward of a 6-layer model already comes near the fp32-era alarm on the
    # max ("> 0.1: broken sync"; 0.107 here), which grows with depth and batch size
    assert gap.max() > 0.05 and gap.max() > 3 * gap.mean()
    # while its mean sits well under the bf16 limit, with room for a second bf16 end (sqrt 2)
    assert math.sqrt(2) * gap.mean() < engine_logprob_gap_limit("bfloat16") / 1.5
    assert engine_logprob_gap_limit("float32") < engine_logprob_gap_limit("float16")
    assert engine_logprob_gap_limit("float16") < engine_logprob_gap_limit("bfloat16")
    with pytest.raises(ValueError, match="bfloat16"):
        engine_logprob_gap_limit("int8")
