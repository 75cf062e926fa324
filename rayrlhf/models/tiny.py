"""Tiny models built locally (no hub): a BPE tokenizer, a Llama policy, a critic and a reward model.

Everything is written with `save_pretrained` so the rest of the system loads it exactly as it would
load a user's checkpoint (`from_pretrained`, vLLM `LLM(model=dir)`).

Layout of `make_tiny(out)`:
    out/policy   LlamaForCausalLM            (policy and reference start here)
    out/critic   LlamaForTokenClassification (one label: a value per token; policy backbone)
    out/reward   LlamaForSequenceClassification (one label), fitted to the demo task's gold rule
Each directory carries the tokenizer too.

head_dim is 32 because vLLM's CPU attention kernel rejects 16.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    PreTrainedTokenizerFast,
)

from rayrlhf.data.demo_task import positive_word_fraction

CORPUS = Path(__file__).with_name("tiny_corpus.txt")
SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}


def train_tokenizer(corpus: Path = CORPUS, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus`; common words of the corpus become single tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(corpus)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


# name -> (hidden size, layers, MLP width, key/value heads or None for one per query head).
# The ~100M sizes give meaningful CPU benchmark figures: "100m" is wide and shallow (GPT-2
# small's widths), "100m-deep" is SmolLM-135M's shape (30 layers, grouped-query attention), with
# 2.5x as many tensors to sync.
SIZES = {
    "tiny": (128, 2, 256, None),
    "100m": (768, 12, 3072, None),
    "100m-deep": (576, 30, 1536, 3),
}


def tiny_config(tokenizer: PreTrainedTokenizerFast, size: str = "tiny") -> LlamaConfig:
    """A Llama config from `SIZES`; heads have dim 32 or 64 (vLLM's CPU kernel rejects 16)."""
    hidden, layers, mlp, kv_heads = SIZES[size]
    heads = hidden // (32 if hidden <= 256 else 64)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        num_labels=1,
        dtype="float32",
    )


def fit_reward_to_rule(
    model: LlamaForSequenceClassification,
    tokenizer: PreTrainedTokenizerFast,
    steps: int = 300,
    seed: int = 0,
) -> float:
    """Regress the reward model onto the demo rule's score of random token strings.

    A stand-in for Bradley-Terry training that keeps `make-tiny` to seconds. The strings mix
    kind-word tokens at a random rate, so the rule's whole range [0, 1] is seen. Returns the
    final mean squared error.
    """
    rng = random.Random(seed)
    good_ids = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip() in _good_words()]
    other_ids = [i for i in range(4, len(tokenizer)) if i not in set(good_ids)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        rows = []
        for _ in range(32):
            rate = rng.random()
            n = rng.randint(2, 24)
            rows.append(
                [
                    rng.choice(good_ids) if rng.random() < rate else rng.choice(other_ids)
                    for _ in range(n)
                ]
            )
        texts = [tokenizer.decode(r) for r in rows]
        target = torch.tensor(positive_word_fraction(texts, texts))
        batch = tokenizer.pad({"input_ids": rows}, return_tensors="pt")
        score = model(**batch).logits.squeeze(-1)
        loss = torch.nn.functional.mse_loss(score, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def _good_words() -> frozenset[str]:
    from rayrlhf.data.demo_task import GOOD_WORDS

    return GOOD_WORDS


def make_tiny(out: str | Path, seed: int = 0, size: str = "tiny") -> dict[str, Path]:
    """Build and save the tokenizer, policy, critic and reward model under `out`.

    Only the "tiny" reward model is fitted to the demo rule; larger sizes are for throughput
    benchmarks, where the reward's meaning does not matter.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {sorted(SIZES)}")
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = train_tokenizer()
    tokenizer.padding_side = "left"
    config = tiny_config(tokenizer, size)
    paths = {role: out / role for role in ("policy", "critic", "reward")}

    policy = LlamaForCausalLM(config)
    critic = LlamaForTokenClassification(config)
    critic.model.load_state_dict(policy.model.state_dict())  # same backbone, fresh value head
    reward = LlamaForSequenceClassification(config)
    fitted = "random reward head (benchmark size)"
    if size == "tiny":
        fitted = f"reward-model fit mse={fit_reward_to_rule(reward, tokenizer, seed=seed):.4f}"
    for role, model in (("policy", policy), ("critic", critic), ("reward", reward)):
        model.save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
    print(
        f"{size} models in {out}: {sum(p.numel() for p in policy.parameters()):,} params each; "
        f"{fitted}"
    )
    return paths


def make_tiny_main(out_dir: str, seed: int, size: str) -> None:
    """`rayrlhf make-tiny`."""
    make_tiny(out_dir, seed=seed, size=size)
