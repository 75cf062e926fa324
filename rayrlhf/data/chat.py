"""How a prompt becomes token ids: one rule for PPO prompts, SFT demonstrations and preference
pairs, so every stage of a pipeline conditions the policy the same way.

A prompt is text or a list of chat messages [{role, content}, ...]. With the chat template on,
it is rendered by `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` (a text
prompt as one user message) and tokenized without adding special tokens again: the template
writes its own BOS. With it off, the prompt is the text (messages: their contents joined by
newlines), tokenized with the tokenizer's special tokens. `data.chat_template`:

    auto   on if the policy tokenizer has a chat template, else off (the default)
    on     on; a tokenizer without a template is a config error before anything loads
    off    off, even if the tokenizer has a template
"""

from __future__ import annotations

from rayrlhf.config import ChatTemplateMode, ConfigError
from rayrlhf.data.jsonl import DataError, require_text

Messages = list[dict[str, str]]
Prompt = str | Messages


def use_template(tokenizer, mode: ChatTemplateMode, field: str = "data.chat_template") -> bool:
    """Whether prompts go through the chat template; `on` without one is a `ConfigError`."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise ConfigError(
            f"invalid config:\n  {field}: 'on', but the policy tokenizer has no chat template "
            "(set it to 'auto' or 'off', or use a tokenizer that has one)"
        )
    return has and mode != "off"


def check_messages(value: object, where: str, key: str = "messages") -> Messages:
    """A non-empty list of {role, content} with non-empty string fields; extra keys dropped."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {key!r} must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object with role and content")
        for field in ("role", "content"):
            require_text(m, field, f"{where}: {key}[{i}]")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def read_prompt(row: dict, where: str, key: str, messages_key: str) -> tuple[Prompt, str]:
    """(the row's prompt, the column it came from): `key` holding text or messages, else
    `messages_key` holding messages. A chat prompt must not end with the assistant's message:
    the policy is to write that one."""
    column = key if row.get(key) is not None else messages_key
    if row.get(column) is None:
        names = f"{key!r} or {messages_key!r}" if key != messages_key else repr(key)
        raise DataError(f"{where}: missing key {names}")
    value = row[column]
    if column == key and not isinstance(value, list):
        if not isinstance(value, str):
            raise DataError(
                f"{where}: {key!r} must be text or a list of messages, got {type(value).__name__}"
            )
        return require_text(row, key, where), column
    messages = check_messages(value, where, column)
    if messages[-1]["role"] == "assistant":
        raise DataError(
            f"{where}: the last message of {column!r} is the assistant's; a prompt ends with "
            "the message the policy answers (drop the final assistant turn)"
        )
    return messages, column


def render_prompt(tokenizer, prompt: Prompt, templated: bool, where: str) -> tuple[str, list[int]]:
    """(the prompt text the policy sees, its token ids), by the module's rule."""
    if not templated:
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return text, tokenizer(text, add_special_tokens=True)["input_ids"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # a template is user code (Jinja): it may raise anything
        raise DataError(f"{where}: the chat template rejected the messages: {err}") from None
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]
