"""The critic's old values (`forward_values`, eval mode) and the values `train_step` regresses
(train mode) come from one function: before any update they are equal, so a value loss against
targets equal to the old values is exactly 0.

DeepSpeed's engine is stood in for by the HF model itself (forward; a `backward_step` that
does not update), so this runs anywhere; the same check on a real ZeRO-3 rank is in
tests/e2e/test_families.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForTokenClassification, LlamaConfig, LlamaForCausalLM

from rayrlhf.algorithms.experience import assemble_rollout
from rayrlhf.models.forward import load_model, response_values
from rayrlhf.types import Experience, Sample
from rayrlhf.workers import critic as critic_module
from rayrlhf.workers.critic import CriticWorker

PAD = 0


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory):
    """A causal-LM checkpoint: the critic starts from it with a fresh value head."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=PAD)  # fmt: skip
    path = tmp_path_factory.mktemp("policy")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _worker(model: torch.nn.Module) -> CriticWorker:
    worker = CriticWorker.__new__(CriticWorker)  # no process group: the maths only
    # Backward but no update: train_step sees the weights forward_values saw.
    worker.backward_step = lambda loss: loss.backward()
    worker.engine = model
    worker.spec = SimpleNamespace(micro_batch_size=2, rank=0)
    return worker


def _rollout():
    samples = [
        Sample([5, 6, 7], [8, 9, 10, 2], [0.0] * 4, "a"),
        Sample([11], [12, 2], [0.0] * 2, "b"),
        Sample([13, 14], [15, 16, 17], [0.0] * 3, "c"),
        Sample([18, 19, 20, 21], [22], [0.0], "d"),
    ]
    return assemble_rollout(samples, ["p"] * len(samples), PAD)


def _first_step(worker: CriticWorker, monkeypatch) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(old values, the values train_step computed, its loss) with returns = old values."""
    rollout = _rollout()
    old = worker.forward_values(rollout).value
    seen = []

    def spy(*args):
        values = response_values(*args)
        seen.append(values.detach())
        return values

    monkeypatch.setattr(critic_module, "response_values", spy)
    zeros = torch.zeros_like(old)
    exp = Experience(
        rollout.sequences, rollout.attention_mask, rollout.action_mask,
        zeros, zeros, old_values=old, advantages=zeros, returns=old,
    )  # fmt: skip
    stats = worker.train_step(exp, clip_eps=0.2).value
    return old, torch.cat(seen) * rollout.action_mask, stats.loss


def test_old_values_equal_the_trained_values_before_the_first_update(policy_path, monkeypatch):
    old, trained, loss = _first_step(_worker(load_model("value", policy_path)), monkeypatch)
    assert torch.equal(trained, old)
    assert loss == 0.0


def test_with_hf_default_dropout_they_differ(policy_path, monkeypatch):
    """The control: the head HF builds by default (Dropout(0.1)) fails the same check."""
    torch.manual_seed(0)
    raw = AutoModelForTokenClassification.from_pretrained(policy_path, num_labels=1)
    assert raw.dropout.p == 0.1
    old, trained, loss = _first_step(_worker(raw), monkeypatch)
    assert not torch.equal(trained, old)
    assert loss > 0.0
