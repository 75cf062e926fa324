"""SFT rows: rendering (plain and chat template), the batch layout, and every bad-row case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dataset_files import plain
from transformers import AutoTokenizer

from rayrlhf.data.demo_task import GOOD_WORDS, positive_word_fraction
from rayrlhf.data.demonstrations import load_demonstrations, synthetic_demonstrations
from rayrlhf.data.jsonl import DataError


@pytest.fixture(scope="module")
def tok(tiny_models):
    # Without a chat template: the plain rendering (the template's is tested on its own below).
    return plain(AutoTokenizer.from_pretrained(tiny_models["policy"]))


def _write(tmp_path: Path, lines: list[str], end: str = "\n") -> Path:
    path = tmp_path / "demos.jsonl"
    path.write_text("\n".join(lines) + end)
    return path


GOOD = json.dumps({"prompt": "Tell me about the cat.", "response": "it is warm."})


def test_plain_rows_are_prompt_space_response_with_eos(tok, tmp_path):
    path = _write(tmp_path, [GOOD, "", json.dumps({"prompt": "Hi", "response": "ok then"})])
    rows = load_demonstrations(path, tok, max_len=64)
    assert len(rows) == 2 and rows.skipped == 0
    full = tok("Tell me about the cat.")["input_ids"]
    assert list(rows.prompt_ids[0]) == full
    assert list(rows.response_ids[0]) == tok(" it is warm.", add_special_tokens=False)[
        "input_ids"
    ] + [tok.eos_token_id]
    batch = rows.batch([0, 1])
    # prompt left-padded, response right-padded: the loss mask covers exactly the response
    assert batch.action_mask.sum(1).tolist() == [len(r) for r in rows.response_ids]
    assert batch.sequences.shape[1] == batch.attention_mask.shape[1]
    assert batch.attention_mask.sum(1).tolist() == [
        len(p) + len(r) for p, r in zip(rows.prompt_ids, rows.response_ids)
    ]
    assert tok.decode(batch.sequences[1][batch.attention_mask[1].bool()]).endswith("ok then</s>")


def test_chat_rows_without_template_join_the_context(tok, tmp_path):
    msgs = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Describe the sea:"},
        {"role": "assistant", "content": "it is calm."},
    ]
    rows = load_demonstrations(_write(tmp_path, [json.dumps({"messages": msgs})]), tok, 64)
    assert rows.prompts[0] == "Be kind.\nDescribe the sea:"
    assert tok.decode(rows.response_ids[0]) == " it is calm.</s>"


def test_chat_template_is_used_when_present(tiny_models, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    rows = load_demonstrations(_write(tmp_path, [GOOD]), tok, 64)
    assert rows.prompts[0] == "<user>Tell me about the cat.<assistant>"
    assert tok.decode(rows.response_ids[0]) == "it is warm.</s>"


BAD_ROWS = [
    ('{"response": "x"}', "missing key 'prompt'"),
    ('{"prompt": "x"}', "missing key 'response'"),
    ('{"prompt": 3, "response": "x"}', "'prompt' must be a string, got int"),
    ('{"prompt": "x", "response": ["a"]}', "'response' must be a string, got list"),
    ('{"prompt": "  ", "response": "x"}', "'prompt' is empty"),
    ('{"prompt": "x", "response": ""}', "'response' is empty"),
    ('["x", "y"]', "expected a JSON object"),
    ('{"prompt": "x", "response": "y"', "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "at least 2 messages"),
    (
        '{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}',
        "last message must have role 'assistant'",
    ),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}', "'content'"),
    (json.dumps({"prompt": "word " * 80, "response": "x"}), "more than data.max_len=64"),
]


@pytest.mark.parametrize("line,reason", BAD_ROWS)
def test_bad_row_names_file_line_and_reason(tok, tmp_path, line, reason):
    path = _write(tmp_path, [GOOD, line, GOOD])
    with pytest.raises(DataError, match=rf"{path}:2: .*{reason}"):
        load_demonstrations(path, tok, max_len=64)


def test_invalid_utf8_names_its_line_and_the_other_rows_still_load_when_skipping(tok, tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "\xff", "response": "x"}\n' + b"\n")
    with pytest.raises(DataError, match=rf"{path}:2: invalid UTF-8"):
        load_demonstrations(path, tok, 64)
    assert len(load_demonstrations(path, tok, 64, on_bad_row="skip")) == 1


def test_truncated_last_line_is_named(tok, tmp_path):
    path = _write(tmp_path, [GOOD, '{"prompt": "x", "resp'], end="")
    with pytest.raises(DataError, match=rf"{path}:2: truncated last line"):
        load_demonstrations(path, tok, 64)


def test_empty_file(tok, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=rf"{path}: no demonstrations in the file"):
        load_demonstrations(path, tok, 64)


def test_skip_mode_counts_bad_rows_and_keeps_good_ones(tok, tmp_path):
    path = _write(tmp_path, [GOOD, BAD_ROWS[0][0], GOOD, BAD_ROWS[-1][0]])
    rows = load_demonstrations(path, tok, 64, on_bad_row="skip")
    assert (len(rows), rows.skipped) == (2, 2)


def test_skip_mode_still_fails_when_nothing_is_left(tok, tmp_path):
    path = _write(tmp_path, [BAD_ROWS[0][0], BAD_ROWS[1][0]])
    with pytest.raises(DataError, match=r"no demonstrations in the file \(2 bad, first: .*:1:"):
        load_demonstrations(path, tok, 64, on_bad_row="skip")


def test_synthetic_demonstrations_use_kind_words_and_hold_out_unseen_responses():
    train, held = synthetic_demonstrations(200, 50, seed=3)
    assert len(train) == 200 and len(held) == 50
    assert min(positive_word_fraction([], [r["response"] for r in train + held])) > 0
    seen = {r["response"] for r in train}
    assert not seen & {r["response"] for r in held}
    assert all(set(r) == {"prompt", "response"} for r in train)
    assert any(w in train[0]["response"] for w in GOOD_WORDS)
