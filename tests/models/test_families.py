"""`make-tiny --family`: the real architectures, loaded back through `from_pretrained`, with
tokenizers that behave like the real ones where runs break on contact (pad, EOS, BOS, chat
template, special tokens)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rayrlhf.cli import build_parser
from rayrlhf.models.families import FAMILIES
from rayrlhf.models.forward import load_model
from rayrlhf.models.tiny import FAMILY_NAMES, make_tiny

ARCH = {
    "llama3": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
CHAT = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Tell me about the cat."},
]
# What each real template writes for CHAT with add_generation_prompt (Mistral has no generation
# prompt: [/INST] is the cue).
RENDERED = {
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe kind.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nTell me about the cat.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2": "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nTell me about the cat."
    "<|im_end|>\n<|im_start|>assistant\n",
    "qwen3": "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nTell me about the cat."
    "<|im_end|>\n<|im_start|>assistant\n",
    "mistral": "<s>[INST] Be kind.\n\nTell me about the cat.[/INST]",
}
# No pad token where the real tokenizer has none; Qwen's pad is <|endoftext|>, not its EOS.
PAD = {"llama3": None, "qwen2": "<|endoftext|>", "qwen3": "<|endoftext|>", "mistral": None}
EOS = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>", "mistral": "</s>"}
BOS = {"llama3": "<|begin_of_text|>", "qwen2": None, "qwen3": None, "mistral": "<s>"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    return name, make_tiny(tmp_path_factory.mktemp(name), family=name)


def test_the_cli_offers_every_family():
    sub = build_parser()._subparsers._group_actions[0].choices["make-tiny"]
    arg = next(a for a in sub._actions if a.dest == "family")
    assert tuple(arg.choices) == FAMILY_NAMES and arg.default == "tiny"


def test_models_are_the_real_architecture_with_head_dim_32(family):
    name, paths = family
    model = AutoModelForCausalLM.from_pretrained(paths["policy"])
    assert type(model).__name__ == ARCH[name]
    cfg = model.config
    assert cfg.head_dim == 32 and cfg.num_attention_heads * 32 == cfg.hidden_size
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query, as the real ones
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert cfg.tie_word_embeddings == tied == (name == "qwen3")  # Qwen3's small models are tied
    tok = AutoTokenizer.from_pretrained(paths["policy"])
    assert cfg.vocab_size == len(tok) and cfg.eos_token_id == tok.eos_token_id
    out = model(input_ids=torch.tensor([tok("Tell me about the cat.")["input_ids"]]))
    assert torch.isfinite(out.logits).all()


def test_tokenizer_specials_behave_like_the_real_ones(family):
    name, paths = family
    tok = AutoTokenizer.from_pretrained(paths["policy"])
    assert tok.pad_token == PAD[name]
    assert tok.eos_token == EOS[name] and tok.bos_token == BOS[name]
    if tok.pad_token is not None:
        assert tok.pad_token_id != tok.eos_token_id
    for t in FAMILIES[name].special_tokens:  # each is one id, never split by the BPE
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    specials = set(tok.all_special_ids)
    if FAMILIES[name].specials_first:
        assert specials == set(range(len(specials)))
    else:  # after the trained vocabulary, as Llama-3's 128000+ and Qwen's 151643+
        assert min(specials) >= len(tok) - len(specials)
    ids = tok("Tell me about the cat.")["input_ids"]
    assert (ids[0] == tok.bos_token_id) == (BOS[name] is not None)
    assert tok.decode(ids, skip_special_tokens=True) == "Tell me about the cat."


def test_chat_template_is_the_family_format(family):
    name, paths = family
    tok = AutoTokenizer.from_pretrained(paths["policy"])
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == RENDERED[name]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == (0 if BOS[name] is None else 1)


def test_generation_config_stops_where_the_real_one_does(family):
    name, paths = family
    tok = AutoTokenizer.from_pretrained(paths["policy"])
    eos = GenerationConfig.from_pretrained(paths["policy"]).eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    assert tok.eos_token_id in eos
    if name == "llama3":  # a base-model style <|end_of_text|> also ends a response
        assert tok.convert_tokens_to_ids("<|end_of_text|>") in eos


def test_critic_and_reward_start_from_the_causal_lm(family, capsys):
    _, paths = family
    for kind in ("value", "reward"):
        model = load_model(kind, str(paths["policy"]))
        assert model.config.num_labels == 1
        assert "fresh one-label head" in capsys.readouterr().out
        ids = torch.tensor([[5, 6, 7, 8]])
        assert model(input_ids=ids).logits.shape[-1] == 1


def test_default_tiny_template_keeps_single_prompts_as_they_were(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    prompt = "Tell me about the cat."
    one = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    assert one == prompt  # the demo's prompts, reward model and figures are unchanged
    assert tok(one, add_special_tokens=False)["input_ids"] == tok(prompt)["input_ids"]
    turns = CHAT + [{"role": "assistant", "content": "A warm cat."}]
    assert tok.apply_chat_template(turns, tokenize=False) == (
        "Be kind.</s>Tell me about the cat.</s>A warm cat.</s>"
    )
    assert (tok.pad_token, tok.eos_token, len(tok)) == ("<pad>", "</s>", 512)
