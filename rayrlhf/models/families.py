"""Tiny stand-ins for real model families: their transformers config classes, random weights, and
tokenizers that behave like the real ones where runs break on contact.

What each family's tokenizer copies from the real one (Llama-3-Instruct, Qwen2.5-Instruct,
Qwen3, Mistral-7B-Instruct-v0.3):
- its special tokens, placed where the real ones are (after the BPE vocabulary, or first for
  Mistral), so no code may assume that small ids are special;
- a pad token only where the real one has one (Qwen's `<|endoftext|>`), distinct from EOS (the
  instruct models' end-of-turn token); Llama-3 and Mistral have none;
- BOS prepended by the tokenizer itself where the real one does it (Llama-3, Mistral);
- a chat template in the real format (tools, dates and thinking history left out);
- Llama-3's second stop token (`<|end_of_text|>`) in the generation config, as vLLM reads it.

The BPE vocabulary is trained on the project's tiny corpus, so every family speaks the demo task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

CORPUS = Path(__file__).with_name("tiny_corpus.txt")
BPE_VOCAB = 512
"""Trained tokens of every family's vocabulary, its special tokens not counted."""

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
"""Meta-Llama-3-8B-Instruct's template, verbatim."""

QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen2.5-Instruct's ChatML with its default system prompt (tool calls left out)."""

QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
"""Qwen3's ChatML: no default system prompt; `enable_thinking=False` writes an empty think
block, as the real template does (tool calls and reasoning history left out)."""

MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system = none %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system %}{{- '[INST] ' + system + '\\n\\n' + message['content']"
    " + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)
"""Mistral-7B-Instruct-v0.3's [INST] format: the system prompt joins the last user message; no
generation prompt (`[/INST]` is the cue)."""


@dataclass(frozen=True)
class Family:
    """What makes a tiny model look like one of a real family."""

    config_class: type[PretrainedConfig]
    special_tokens: tuple[str, ...]
    """The real tokenizer's special tokens (a few of them), in the order of their ids."""
    roles: dict[str, str]
    """Tokenizer roles (bos_token, eos_token, pad_token, unk_token) -> token text; a role left
    out is one the real tokenizer does not have."""
    chat_template: str
    prepend_bos: bool
    """The tokenizer adds BOS itself (a post-processor), as the real one does."""
    specials_first: bool = False
    """Special tokens take the first ids (SentencePiece-style) instead of following the BPE
    vocabulary."""
    metaspace: bool = False
    """SentencePiece-style pre-tokenizer ('▁' marks a space) instead of byte-level BPE."""
    generation_eos: tuple[str, ...] = ()
    """Extra tokens the generation config stops on besides EOS."""
    config_kwargs: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "llama3": Family(
        LlamaConfig,
        ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
         "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eot_id|>"),
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        LLAMA3_TEMPLATE, prepend_bos=True, generation_eos=("<|end_of_text|>",),
        config_kwargs={"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    ),
    "qwen2": Family(
        Qwen2Config,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        QWEN2_TEMPLATE, prepend_bos=False, generation_eos=("<|endoftext|>",),
        config_kwargs={"use_sliding_window": False},
    ),
    "qwen3": Family(
        Qwen3Config,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        QWEN3_TEMPLATE, prepend_bos=False, generation_eos=("<|endoftext|>",),
        config_kwargs={"tie_word_embeddings": True},  # as Qwen3-0.6B to 4B: one matrix
    ),
    "mistral": Family(
        MistralConfig,
        ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
        MISTRAL_TEMPLATE, prepend_bos=True, specials_first=True, metaspace=True,
        config_kwargs={"sliding_window": None},
    ),
}  # fmt: skip


def family_tokenizer(name: str, corpus: Path = CORPUS) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on `corpus` with family `name`'s special tokens and template."""
    fam = FAMILIES[name]
    specials = list(fam.special_tokens)
    tok = Tokenizer(models.BPE(unk_token=fam.roles.get("unk_token")))
    if fam.metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        # SentencePiece's byte fallback is left out: printable ASCII is in the vocabulary.
        alphabet = ["▁", "\n", *map(chr, range(33, 127))]
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB + (len(specials) if fam.specials_first else 0),
        special_tokens=specials if fam.specials_first else [],
        initial_alphabet=alphabet,
    )
    tok.train([str(corpus)], trainer)
    if not fam.specials_first:
        tok.add_special_tokens(specials)  # after the trained vocabulary, as in the real ones
    if fam.prepend_bos:
        bos = fam.roles["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    extra = [t for t in specials if t not in fam.roles.values()]
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, additional_special_tokens=extra, **fam.roles
    )
    out.chat_template = fam.chat_template
    return out


def config_fields(
    tokenizer: PreTrainedTokenizerFast, hidden: int, layers: int, mlp: int, heads: int, kv: int
) -> dict:
    """What every tiny config says: its widths, the tokenizer's special ids, untied embeddings
    (unless the family's `config_kwargs` tie them), one label for the critic and reward heads,
    float32."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": 256,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
        "num_labels": 1,
        "dtype": "float32",
    }


def family_config(
    name: str, tokenizer: PreTrainedTokenizerFast, hidden: int, layers: int, mlp: int
) -> PretrainedConfig:
    """Family `name`'s config class at the given widths: heads of dim 32 (vLLM's CPU kernel
    rejects 16), two query heads per key/value head (grouped-query attention, as the real ones)."""
    fam = FAMILIES[name]
    heads = hidden // 32
    fields = config_fields(tokenizer, hidden, layers, mlp, heads, max(heads // 2, 1))
    return fam.config_class(**(fields | fam.config_kwargs), head_dim=32)


def generation_eos_ids(name: str, tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """EOS and the family's other stop tokens, for the saved generation config."""
    extra = [tokenizer.convert_tokens_to_ids(t) for t in FAMILIES[name].generation_eos]
    return [tokenizer.eos_token_id, *extra]
