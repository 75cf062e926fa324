"""Tiny models built locally (no hub): a BPE tokenizer, a policy, a critic and a reward model.

Everything is written with `save_pretrained` so the rest of the system loads it exactly as it would
load a user's checkpoint (`from_pretrained`, vLLM `LLM(model=dir)`).

Layout of `make_tiny(out)` (`*` is the family's architecture: Llama for the default):
    out/policy   *ForCausalLM            (policy and reference start here)
    out/critic   *ForTokenClassification (one label: a value per token; policy backbone)
    out/reward   *ForSequenceClassification (one label); the default's is fitted to the demo
                 task's gold rule, the other families' head is random
Each directory carries the tokenizer too.

The default family ("tiny") is the demo's model. `--family llama3|qwen2|qwen3|mistral` builds the
real architectures with tokenizers that behave like the real ones (`rayrlhf.models.families`).
head_dim is 32 because vLLM's CPU attention kernel rejects 16.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from rayrlhf.data.demo_task import positive_word_fraction
from rayrlhf.models.families import (
    FAMILIES,
    config_fields,
    family_config,
    family_tokenizer,
    generation_eos_ids,
)

CORPUS = Path(__file__).with_name("tiny_corpus.txt")
SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}{%- if not loop.first %}{{- eos_token }}{%- endif %}"
    "{{- message['content'] }}{%- endfor %}"
    "{%- if messages[-1]['role'] == 'assistant' %}{{- eos_token }}{%- endif %}"
)
"""The default tokenizer's chat format: turns joined by EOS, no role markers (DialoGPT's). A
one-message prompt renders as its own text, so templated demo prompts keep the ids the demo's
policy, reward model and figures were made with; the policy answers after the last turn and
ends its turn with EOS, as SFT teaches it."""
FAMILY_NAMES = ("tiny", *FAMILIES)


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
    out = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    out.chat_template = TINY_CHAT_TEMPLATE  # added tokens and ids are unchanged by it
    return out


# name -> (hidden size, layers, MLP width, key/value heads or None for one per query head).
# The ~100M sizes give meaningful CPU benchmark figures: "100m" is wide and shallow (GPT-2
# small's widths), "100m-deep" is SmolLM-135M's shape (30 layers, grouped-query attention), with
# 2.5x as many tensors to sync.
SIZES = {
    "tiny": (128, 2, 256, None),
    "small": (256, 4, 1024, None),  # the arithmetic task's: "tiny" cannot learn it well
    # enough after SFT for RL to have signal (configs/tiny-cpu-math.yaml)
    "100m": (768, 12, 3072, None),
    "100m-deep": (576, 30, 1536, 3),
}


def tiny_config(tokenizer: PreTrainedTokenizerFast, size: str = "tiny") -> LlamaConfig:
    """A Llama config from `SIZES`; heads have dim 32 or 64 (vLLM's CPU kernel rejects 16)."""
    hidden, layers, mlp, kv_heads = SIZES[size]
    heads = hidden // (32 if hidden <= 256 else 64)
    return LlamaConfig(**config_fields(tokenizer, hidden, layers, mlp, heads, kv_heads or heads))


def fit_reward_to_rule(
    model: PreTrainedModel,
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
    skip = set(good_ids) | set(tokenizer.all_special_ids)
    other_ids = [i for i in range(len(tokenizer)) if i not in skip]
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


def tokenizer_and_config(
    family: str, size: str
) -> tuple[PreTrainedTokenizerFast, PretrainedConfig]:
    """The tokenizer and model config of `family` at `size` (widths from `SIZES`)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {sorted(SIZES)}")
    if family not in FAMILY_NAMES:
        raise ValueError(f"unknown family {family!r}; valid: {list(FAMILY_NAMES)}")
    if family == "tiny":
        tokenizer = train_tokenizer()
        config = tiny_config(tokenizer, size)
    else:
        tokenizer = family_tokenizer(family)
        hidden, layers, mlp, _ = SIZES[size]
        config = family_config(family, tokenizer, hidden, layers, mlp)
    tokenizer.padding_side = "left"
    return tokenizer, config


def make_tiny(
    out: str | Path, seed: int = 0, size: str = "tiny", family: str = "tiny"
) -> dict[str, Path]:
    """Build and save the tokenizer, policy, critic and reward model under `out`.

    Only the default family's "tiny" reward model is fitted to the demo rule; larger sizes are
    for throughput benchmarks and other families for the plumbing of real architectures, where
    the reward's meaning does not matter.
    """
    tokenizer, config = tokenizer_and_config(family, size)
    out = Path(out)
    torch.manual_seed(seed)
    paths = {role: out / role for role in ("policy", "critic", "reward")}

    policy = AutoModelForCausalLM.from_config(config)
    critic = AutoModelForTokenClassification.from_config(config)
    critic.base_model.load_state_dict(policy.base_model.state_dict())  # fresh value head
    reward = AutoModelForSequenceClassification.from_config(config)
    fitted = "random reward head"
    if size == "tiny" and family == "tiny":
        fitted = f"reward-model fit mse={fit_reward_to_rule(reward, tokenizer, seed=seed):.4f}"
    if family != "tiny":
        policy.generation_config.eos_token_id = generation_eos_ids(family, tokenizer)
    for role, model in (("policy", policy), ("critic", critic), ("reward", reward)):
        model.save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
    print(
        f"{family} {size} models ({type(policy).__name__}) in {out}: "
        f"{sum(p.numel() for p in policy.parameters()):,} params each; {fitted}"
    )
    return paths


def make_tiny_main(out_dir: str, seed: int, size: str, family: str) -> None:
    """`rayrlhf make-tiny`."""
    make_tiny(out_dir, seed=seed, size=size, family=family)
