"""Greedy samples from an HF policy directory and their demo-task gold score (on one CPU process).

Used to judge SFT and PPO policies outside Ray: HF `generate`, greedy, left-padded prompts,
rendered as PPO renders them (`rayrlhf.data.chat`, 'auto'), so the report asks the policy in the
form it was trained on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayrlhf.data.chat import render_prompt, use_template
from rayrlhf.data.demo_task import positive_word_fraction
from rayrlhf.models.tokenizer import pad_id


@torch.no_grad()
def greedy_samples(
    model_path: str | Path, prompts: list[str], max_new_tokens: int = 16, batch: int = 32
) -> list[str]:
    """The greedy continuation of every prompt (special tokens stripped)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    templated = use_template(tokenizer, "auto")
    prompt_ids = [render_prompt(tokenizer, p, templated, "report prompt")[1] for p in prompts]
    pad = pad_id(tokenizer)
    out: list[str] = []
    for start in range(0, len(prompt_ids), batch):
        chunk = prompt_ids[start : start + batch]
        width = max(len(x) for x in chunk)
        # Left padding by hand: Llama-3 and Mistral tokenizers have no pad token to pad with.
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        out += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return out


def greedy_gold_score(
    model_path: str | Path, prompts: list[str], max_new_tokens: int = 16
) -> tuple[float, list[str]]:
    """(mean `positive_word_fraction` of the greedy samples, the samples)."""
    samples = greedy_samples(model_path, prompts, max_new_tokens)
    scores = positive_word_fraction(prompts, samples)
    return sum(scores) / max(len(scores), 1), samples
