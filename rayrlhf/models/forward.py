"""Forward passes shared by the roles, on the batch layout of `rayrlhf.types`.

Position ids are counted over real tokens only (left padding does not shift them), which is what
vLLM does, so trainer logprobs match the engine's.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PretrainedConfig,
)

from rayrlhf.algorithms.losses import entropy_from_logits, logprobs_from_logits

LOADERS = {
    "causal_lm": AutoModelForCausalLM,
    "value": AutoModelForTokenClassification,
    "reward": AutoModelForSequenceClassification,
}
CLASSIFIER_SUFFIXES = ("ForTokenClassification", "ForSequenceClassification")
"""Architectures whose checkpoint carries a head that a critic or reward model can keep."""


def load_model(kind: str, path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`from_pretrained` for a policy ('causal_lm'), critic ('value') or reward model ('reward'),
    built from `role_config` and with every dropout module off."""
    config = role_config(kind, path)  # first: it names the valid kinds
    model = LOADERS[kind].from_pretrained(path, config=config, dtype=dtype)
    disable_dropout(model)
    return model


def role_config(kind: str, path: str) -> PretrainedConfig:
    """The config a role's model is built from: `path`'s, with dropout off.

    A critic or reward model starts from a one-label classifier (its head is kept) or from any
    other checkpoint of the architecture, a causal LM say: its backbone then gets a fresh
    one-label head, and the log says so. Pass it as `from_pretrained(path, config=...)`.
    """
    if kind not in LOADERS:
        raise ValueError(f"unknown model kind {kind!r}; valid: {sorted(LOADERS)}")
    config = AutoConfig.from_pretrained(path)
    disable_dropout_in_config(config)
    if kind != "causal_lm":
        _scalar_head(config, kind, path)
        config.classifier_dropout = 0.0  # else the token-classification head falls back to 0.1
    return config


def _scalar_head(config: PretrainedConfig, kind: str, path: str) -> None:
    """Ask for one label: a classifier checkpoint must already have one, any other checkpoint
    gets a fresh head (a causal LM's config says 2 labels by default, meaning nothing)."""
    archs = config.architectures or []
    if any(a.endswith(CLASSIFIER_SUFFIXES) for a in archs):
        if config.num_labels != 1:
            raise ValueError(f"{path}: a {kind} model needs num_labels=1, has {config.num_labels}")
        return
    config.num_labels = 1
    print(
        f"{kind} model: {path} is a {'/'.join(archs) or 'headless'} checkpoint; its backbone "
        "gets a fresh one-label head",
        flush=True,
    )


def disable_dropout_in_config(config: PretrainedConfig) -> None:
    """Every dropout probability of `config` set to 0, before the model is built from it.

    Old logprobs and values are computed in eval mode and the update in train mode, so any
    dropout makes them different functions (TRL's `disable_dropout` does the same). The config
    matters beyond `nn.Dropout` modules: attention dropout is a functional argument read from it.
    """
    for name, value in config.to_dict().items():
        if ("dropout" in name or name.endswith("pdrop")) and type(value) in (int, float):
            setattr(config, name, 0.0)


def disable_dropout(model: nn.Module) -> None:
    """p = 0 in every dropout module, for what the config does not reach."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0


def position_ids(attention_mask: Tensor) -> Tensor:
    """[B, T] positions 0.. over real tokens; padding gets 0 (it is masked anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _inputs(sequences: Tensor, attention_mask: Tensor, device: torch.device) -> dict:
    """A forward's inputs. No KV cache: nothing is decoded after a scoring or training forward,
    yet the cache (on by the config's default) would hold every layer's keys and values."""
    return {
        "input_ids": sequences.to(device),
        "attention_mask": attention_mask.to(device),
        "position_ids": position_ids(attention_mask).to(device),
        "use_cache": False,
    }


@functools.cache
def _keeps_logits(cls: type) -> bool:
    """Whether a causal LM class can compute logits for its last positions only."""
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def response_logprobs(
    model: nn.Module,
    sequences: Tensor,
    attention_mask: Tensor,
    response_len: int,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Logprobs [B, R] of the response tokens (and per-token entropy [B, R] if asked)."""
    device = next(model.parameters()).device
    inputs = _inputs(sequences, attention_mask, device)
    if _keeps_logits(type(getattr(model, "module", model))):  # a DeepSpeed engine wraps it
        inputs["logits_to_keep"] = response_len + 1  # no LM head over the prompt's positions
    logits = model(**inputs).logits
    logits = logits[:, -response_len - 1 : -1]  # the logit at t predicts token t+1
    labels = sequences[:, -response_len:].to(device)
    logprobs = logprobs_from_logits(logits, labels)
    entropy = entropy_from_logits(logits) if with_entropy else None
    return logprobs, entropy


def response_values(
    model: nn.Module, sequences: Tensor, attention_mask: Tensor, response_len: int
) -> Tensor:
    """Critic values [B, R]: V of the state before each response token."""
    device = next(model.parameters()).device
    out = model(**_inputs(sequences, attention_mask, device)).logits.squeeze(-1)
    return out[:, -response_len - 1 : -1].float()


def sequence_scores(model: nn.Module, sequences: Tensor, attention_mask: Tensor) -> Tensor:
    """Reward-model scores [B] read at each row's last real token.

    Pools with the attention mask rather than the model's own pad-id search, so it stays right
    when pad == eos (common in real tokenizers) and for left or right padding.
    """
    device = next(model.parameters()).device
    hidden = model.base_model(**_inputs(sequences, attention_mask, device)).last_hidden_state
    head = getattr(model, "score", None)
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no 'score' head; expected a *ForSequenceClassification"
        )
    columns = torch.arange(sequences.shape[1], device=device)
    last = (columns * attention_mask.to(device)).argmax(-1)
    pooled = hidden[torch.arange(sequences.shape[0], device=device), last]
    return head(pooled).squeeze(-1).float()
