"""Facts about a role's tokenizer that every loader needs, whatever the model family."""

from __future__ import annotations


def pad_id(tokenizer) -> int:
    """The id that fills padded positions: the tokenizer's pad id, else its EOS id, else 0.

    Llama-3 and Mistral tokenizers have no pad token. Padded positions are masked out of every
    forward pass and loss (attention and action masks), so any id serves; EOS keeps the id inside
    the vocabulary and means nothing new to the model.
    """
    for tok in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok is not None:
            return tok
    return 0
