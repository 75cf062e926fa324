import pytest
import torch

from rayrlhf.models.forward import (
    load_model,
    position_ids,
    response_logprobs,
    response_values,
    sequence_scores,
)

PROMPT = [40, 41, 42, 43]
RESPONSE = [50, 51, 52]


@pytest.fixture(scope="module")
def models(tiny_models):
    return {
        "policy": load_model("causal_lm", str(tiny_models["policy"])).eval(),
        "critic": load_model("value", str(tiny_models["critic"])).eval(),
        "reward": load_model("reward", str(tiny_models["reward"])).eval(),
    }


@pytest.fixture(scope="module")
def pad_id(models):
    return models["policy"].config.pad_token_id


def test_load_model_bogus_kind_lists_valid(tiny_models):
    with pytest.raises(ValueError) as err:
        load_model("bogus", str(tiny_models["policy"]))
    msg = str(err.value)
    assert "bogus" in msg
    for kind in ("causal_lm", "value", "reward"):
        assert kind in msg


def test_position_ids_by_hand():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]


def _left_padded_batch(pad_id, n_pad):
    """Row 0: PROMPT+RESPONSE unpadded; row 1: the same, left-padded by n_pad."""
    row = PROMPT + RESPONSE
    seq = torch.tensor([[PROMPT[0]] * n_pad + row, [pad_id] * n_pad + row])
    mask = torch.tensor([[1] * (n_pad + len(row)), [0] * n_pad + [1] * len(row)])
    # row 0 is a different (longer) sequence; keep the plain unpadded reference separately
    alone = torch.tensor([row])
    return seq, mask, alone


@torch.no_grad()
def test_response_logprobs_left_padding_matches_unpadded(models, pad_id):
    model = models["policy"]
    r = len(RESPONSE)
    seq, mask, alone = _left_padded_batch(pad_id, n_pad=3)
    padded_lp, entropy = response_logprobs(model, seq, mask, r, with_entropy=True)
    alone_lp, _ = response_logprobs(model, alone, torch.ones_like(alone), r)
    assert padded_lp.shape == (2, r) and entropy.shape == (2, r)
    torch.testing.assert_close(padded_lp[1], alone_lp[0], atol=1e-5, rtol=0)
    assert (padded_lp <= 0).all() and (entropy >= 0).all()

    # The check is sensitive: if the padding were attended to, the padded row would differ.
    leaky, _ = response_logprobs(model, seq, torch.ones_like(mask), r)
    assert (leaky[1] - alone_lp[0]).abs().max() > 1e-3
    # (RoPE is invariant to a uniform position offset, so the positions themselves are checked
    # directly in test_forward_passes_real_token_position_ids.)


class _Spy(torch.nn.Module):
    """Wraps a model and records the keyword arguments of each forward call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, **kwargs):
        self.calls.append(kwargs)
        return self.inner(**kwargs)


@torch.no_grad()
def test_forward_passes_real_token_position_ids(models, pad_id):
    spy = _Spy(models["policy"])
    seq = torch.tensor([[pad_id, pad_id, 40, 41, 50, 51], [40, 41, 42, 43, 50, pad_id]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    response_logprobs(spy, seq, mask, 2)
    (kwargs,) = spy.calls
    assert torch.equal(kwargs["input_ids"], seq)
    assert torch.equal(kwargs["attention_mask"], mask)
    # counted over real tokens: the first real token of every row is position 0
    assert kwargs["position_ids"].tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 4]]


@torch.no_grad()
def test_response_logprobs_equals_manual_log_softmax(models):
    model = models["policy"]
    row = PROMPT + RESPONSE
    seq = torch.tensor([row])
    lp, _ = response_logprobs(model, seq, torch.ones_like(seq), len(RESPONSE))
    logits = model(input_ids=seq).logits[0].double()
    manual = []
    for j, token in enumerate(RESPONSE):
        t = len(PROMPT) + j  # position of the response token; predicted from position t - 1
        manual.append(logits[t - 1, token] - torch.logsumexp(logits[t - 1], -1))
    torch.testing.assert_close(lp[0].double(), torch.stack(manual), atol=1e-5, rtol=0)


@torch.no_grad()
def test_the_lm_head_runs_over_the_response_positions_only_and_no_cache_is_kept(models):
    """The prompt's logits are never read, so they are not computed; nor is a KV cache kept."""
    model, widths, outputs = models["policy"], [], []
    head = model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: widths.append(args[0].shape[1])
    )
    whole = model.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    try:
        seq = torch.tensor([PROMPT + RESPONSE])
        response_logprobs(model, seq, torch.ones_like(seq), len(RESPONSE))
    finally:
        head.remove()
        whole.remove()
    assert widths == [len(RESPONSE) + 1] and len(PROMPT) > 1
    assert outputs[0].past_key_values is None


@torch.no_grad()
def test_response_values_left_padding_matches_unpadded(models, pad_id):
    critic = models["critic"]
    r = len(RESPONSE)
    seq, mask, alone = _left_padded_batch(pad_id, n_pad=2)
    v = response_values(critic, seq, mask, r)
    v_alone = response_values(critic, alone, torch.ones_like(alone), r)
    assert v.shape == (2, r)
    torch.testing.assert_close(v[1], v_alone[0], atol=1e-5, rtol=0)
    # V of the state before response token j is the head at column P - 1 + j.
    full = critic(input_ids=alone).logits[0, :, 0]
    before = full[len(PROMPT) - 1 : len(PROMPT) - 1 + r]
    torch.testing.assert_close(v_alone[0], before, atol=1e-5, rtol=0)


@torch.no_grad()
def test_sequence_scores_independent_of_padding(models, pad_id):
    reward = models["reward"]
    row = PROMPT + RESPONSE
    n = len(row)
    seqs = torch.tensor([row + [pad_id] * 3, [pad_id] * 3 + row, [pad_id] * 3 + row])
    masks = torch.tensor([[1] * n + [0] * 3, [0] * 3 + [1] * n, [0] * 3 + [1] * n])
    padded = sequence_scores(reward, seqs, masks)
    alone = sequence_scores(reward, torch.tensor([row]), torch.ones(1, n, dtype=torch.long))
    assert padded.shape == (3,)
    torch.testing.assert_close(padded, alone.expand(3), atol=1e-5, rtol=0)
    # and agrees with the model's own pooling on an unpadded sequence
    own = reward(input_ids=torch.tensor([row])).logits[0, 0]
    assert abs(own.item() - alone.item()) < 1e-5


@torch.no_grad()
def test_sequence_scores_reads_last_real_token_when_pad_equals_eos(models):
    """With pad == eos a real trailing eos must still be read, and padding must not be."""
    reward = models["reward"]
    eos = reward.config.eos_token_id
    row = PROMPT + RESPONSE + [eos]
    seq = torch.tensor([row + [eos, eos]])
    mask = torch.tensor([[1] * len(row) + [0, 0]])
    got = sequence_scores(reward, seq, mask)
    want = reward(input_ids=torch.tensor([row])).logits[0, 0]
    assert abs(got.item() - want.item()) < 1e-5


def test_sequence_scores_rejects_model_without_score_head(models):
    with pytest.raises(ValueError, match="score"):
        seq = torch.tensor([[1, 2]])
        sequence_scores(models["policy"], seq, torch.ones_like(seq))
