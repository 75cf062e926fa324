"""Prompt sets: JSONL rows and their errors, chat messages through the template, extra columns,
overlong prompts, bad-row skipping, and the reproducible batch order. Parquet and arrow rows
go through the same checks (tests/data/test_sources.py)."""

import json

import pytest
from dataset_files import CHAT_TEMPLATE

from rayrlhf.config import ConfigError, DataConfig
from rayrlhf.data.jsonl import DataError
from rayrlhf.data.prompts import PromptSet


@pytest.fixture(scope="module")
def tokenizer(plain_tok):
    return plain_tok


def _jsonl(tmp_path, data: bytes | str, name="p.jsonl"):
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _load(path, tokenizer, **cfg) -> PromptSet:
    return PromptSet.load(DataConfig(prompts=str(path), **cfg), tokenizer, seed=0)


def _texts(path, tokenizer, **cfg) -> list[str]:
    return _load(path, tokenizer, **cfg).texts


GOOD = '{"prompt": "Tell me about the cat."}\n'


# ---- rows --------------------------------------------------------------------------------------


def test_reads_prompts_skipping_blank_lines(tmp_path, tokenizer):
    path = _jsonl(tmp_path, GOOD + "\n" + '{"prompt": "Describe the sea:", "id": 7}\n')
    assert _texts(path, tokenizer) == ["Tell me about the cat.", "Describe the sea:"]


def test_custom_key(tmp_path, tokenizer):
    path = _jsonl(tmp_path, '{"q": "hello"}\n')
    assert _texts(path, tokenizer, prompt_key="q") == ["hello"]


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ('{"text": "no prompt key"}', "missing key 'prompt' or 'messages'"),
        ('["prompt"]', "expected a JSON object"),
        ('{"prompt": 17}', "'prompt' must be text or a list of messages, got int"),
        ('{"prompt": ""}', "'prompt' is empty"),
        ('{"prompt": "   "}', "'prompt' is empty"),
        ('{"prompt": []}', "'prompt' must be a non-empty list of messages"),
        ('{"messages": [{"role": "user"}]}', "messages[0]: missing key 'content'"),
        ('{"messages": [{"role": "user", "content": 3}]}', "'content' must be a string"),
        ('{"messages": ["hi"]}', "messages[0] must be an object with role and content"),
        (
            '{"messages": [{"role": "user", "content": "hi"}, '
            '{"role": "assistant", "content": "hello"}]}',
            "the last message of 'messages' is the assistant's",
        ),
        ('{"prompt": "unterminated}', "not valid JSON"),
        ("not json at all", "not valid JSON"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, tokenizer, bad_line, problem):
    path = _jsonl(tmp_path, GOOD + "\n" + bad_line + "\n" + GOOD)  # bad row is on line 3
    with pytest.raises(DataError) as err:
        _load(path, tokenizer)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: "), msg
    assert problem in msg


def test_invalid_utf8_on_line_3(tmp_path, tokenizer):
    latin1_row = b'{"prompt": "caf\xe9 au lait"}\n'  # 0xe9 alone is not UTF-8
    path = _jsonl(tmp_path, GOOD.encode() * 2 + latin1_row + GOOD.encode())
    with pytest.raises(DataError) as err:
        _load(path, tokenizer)
    assert str(err.value).startswith(f"{path}:3: ")
    assert "UTF-8" in str(err.value)


def test_truncated_last_line(tmp_path, tokenizer):
    path = _jsonl(tmp_path, GOOD + GOOD + '{"prompt": "cut off"')  # no closing brace, no newline
    with pytest.raises(DataError) as err:
        _load(path, tokenizer)
    assert str(err.value).startswith(f"{path}:3: ")
    assert "truncated last line" in str(err.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, tokenizer, content):
    path = _jsonl(tmp_path, content)
    with pytest.raises(DataError) as err:
        _load(path, tokenizer)
    assert str(path) in str(err.value)
    assert "no prompts" in str(err.value)


def test_missing_file_is_a_data_error_naming_it(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no such file"):
        _load(tmp_path / "absent.jsonl", tokenizer)


def test_unicode_line_separator_inside_a_prompt(tmp_path, tokenizer):
    rows = [{"prompt": "first line\u2028second line"}, {"prompt": "next"}]
    path = _jsonl(tmp_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert _texts(path, tokenizer) == ["first line\u2028second line", "next"]


def test_skip_leaves_bad_rows_out_counts_them_and_says_so(tmp_path, tokenizer, capsys):
    path = _jsonl(tmp_path, GOOD + '{"prompt": 3}\n' + "oops\n" + '{"prompt": "Describe music:"}\n')
    ps = _load(path, tokenizer, on_bad_row="skip")
    assert ps.texts == ["Tell me about the cat.", "Describe music:"]
    assert (ps.skipped, ps.dropped) == (2, 0)
    out = capsys.readouterr().out
    assert "2 kept; skipped 2 bad row(s)" in out and f"{path}:2:" in out


def test_skip_with_nothing_left_is_still_an_error(tmp_path, tokenizer):
    path = _jsonl(tmp_path, '{"prompt": 3}\n{"q": "x"}\n')
    with pytest.raises(DataError, match=r"no prompts in the file \(2 bad"):
        _load(path, tokenizer, on_bad_row="skip")


# ---- extra columns -----------------------------------------------------------------------------


def test_other_columns_travel_with_their_prompt(tmp_path, tokenizer):
    rows = [
        {"prompt": "What is 2+2?", "answer": "4", "meta": {"source": "gsm", "id": 1}},
        {"prompt": "What is 3+3?", "answer": "6", "label": True},
    ]
    path = _jsonl(tmp_path, "".join(json.dumps(r) + "\n" for r in rows))
    ps = PromptSet.load(DataConfig(prompts=str(path)), tokenizer, seed=5)
    assert ps.columns == [
        {"answer": "4", "meta": {"source": "gsm", "id": 1}},
        {"answer": "6", "label": True},
    ]
    drawn = ps.draw(0, 2, repeat=3)
    assert len(drawn) == 6
    for text, columns in zip(drawn.texts, drawn.columns):  # each row's columns, in step
        assert columns["answer"] == str(int(text[8]) * 2)


def test_demo_prompts_have_no_extra_columns(tokenizer):
    ps = PromptSet.load(DataConfig(num_demo_prompts=4), tokenizer, seed=0)
    assert ps.draw(0, 4).columns == [{}] * 4


# ---- chat messages and the template ------------------------------------------------------------


MESSAGES = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Describe the sea:"},
]


def test_messages_go_through_the_chat_template_with_the_generation_prompt(tmp_path, chat_tok):
    path = _jsonl(tmp_path, json.dumps({"messages": MESSAGES, "answer": "calm"}) + "\n")
    ps = _load(path, chat_tok)
    expected = chat_tok.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert ps.ids == [list(expected)]
    assert ps.texts == ["<s><|system|>Be kind.\n<|user|>Describe the sea:\n<|assistant|>"]
    assert ps.ids[0].count(chat_tok.bos_token_id) == 1  # the template's BOS, not a second one
    assert ps.columns == [{"answer": "calm"}]


def test_messages_under_the_prompt_key_are_a_chat_too(tmp_path, chat_tok):
    """TRL's conversational prompt-only rows: {"prompt": [{role, content}, ...]}."""
    a = _load(_jsonl(tmp_path, json.dumps({"prompt": MESSAGES}) + "\n", "a.jsonl"), chat_tok)
    b = _load(_jsonl(tmp_path, json.dumps({"messages": MESSAGES}) + "\n", "b.jsonl"), chat_tok)
    assert a.ids == b.ids


def test_auto_templates_text_prompts_as_one_user_message(tmp_path, chat_tok):
    ps = _load(_jsonl(tmp_path, GOOD), chat_tok)
    assert ps.texts == ["<s><|user|>Tell me about the cat.\n<|assistant|>"]


def test_off_keeps_raw_text_and_joins_messages(tmp_path, chat_tok, tokenizer):
    path = _jsonl(tmp_path, GOOD + json.dumps({"messages": MESSAGES}) + "\n")
    ps = _load(path, chat_tok, chat_template="off")
    assert ps.texts == ["Tell me about the cat.", "Be kind.\nDescribe the sea:"]
    assert ps.ids[0] == tokenizer("Tell me about the cat.")["input_ids"]
    assert _load(path, tokenizer).ids == ps.ids  # auto without a template: the same


def test_on_without_a_template_is_a_config_error(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="data.chat_template: 'on', but the policy tokenizer"):
        _load(_jsonl(tmp_path, GOOD), tokenizer, chat_template="on")


def test_on_with_a_template_templates(tmp_path, chat_tok):
    assert _texts(_jsonl(tmp_path, GOOD), chat_tok, chat_template="on")[0].startswith("<s><|user|>")


def test_a_template_that_raises_names_the_row(tmp_path, tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        + CHAT_TEMPLATE
    )
    path = _jsonl(tmp_path, GOOD + json.dumps({"messages": MESSAGES}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: the chat template rejected .*no system role"):
        _load(path, tok)


# ---- overlong prompts --------------------------------------------------------------------------

LONG = " ".join(["the weather is calm"] * 20)


def test_too_long_prompt_names_file_and_line(tmp_path, tokenizer):
    n_tokens = len(tokenizer(LONG)["input_ids"])
    limit = 16
    assert n_tokens > limit
    path = _jsonl(tmp_path, GOOD + json.dumps({"prompt": LONG}) + "\n")
    with pytest.raises(DataError) as err:
        _load(path, tokenizer, max_prompt_tokens=limit)
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: ")
    assert str(n_tokens) in msg
    assert "data.max_prompt_tokens=16" in msg


def test_the_limit_counts_the_chat_template(tmp_path, tokenizer, chat_tok):
    path = _jsonl(tmp_path, GOOD)
    raw = len(_load(path, tokenizer).ids[0])
    with pytest.raises(DataError, match="more than data.max_prompt_tokens"):
        _load(path, chat_tok, max_prompt_tokens=raw)


def test_overlong_drop_leaves_long_prompts_out_and_counts_them(tmp_path, tokenizer, capsys):
    path = _jsonl(tmp_path, GOOD + json.dumps({"prompt": LONG}) + "\n" + GOOD)
    ps = _load(path, tokenizer, max_prompt_tokens=16, overlong="drop")
    assert ps.texts == ["Tell me about the cat."] * 2
    assert (ps.skipped, ps.dropped) == (0, 1)
    assert "dropped 1 prompt(s) over data.max_prompt_tokens=16" in capsys.readouterr().out


def test_overlong_error_holds_even_when_skipping_bad_rows(tmp_path, tokenizer):
    path = _jsonl(tmp_path, GOOD + json.dumps({"prompt": LONG}) + "\n")
    with pytest.raises(DataError, match=f"{path}:2: prompt has"):
        _load(path, tokenizer, max_prompt_tokens=16, on_bad_row="skip")


def test_dropping_every_prompt_is_an_error(tmp_path, tokenizer):
    path = _jsonl(tmp_path, json.dumps({"prompt": LONG}) + "\n")
    with pytest.raises(DataError, match="no prompt fits data.max_prompt_tokens=16"):
        _load(path, tokenizer, max_prompt_tokens=16, overlong="drop")


def test_load_tokenizes_jsonl(tmp_path, tokenizer):
    path = _jsonl(tmp_path, GOOD + '{"prompt": "Describe the sea:"}\n')
    ps = _load(path, tokenizer)
    assert ps.texts == ["Tell me about the cat.", "Describe the sea:"]
    assert ps.ids[1] == tokenizer("Describe the sea:")["input_ids"]
    assert tokenizer.decode(ps.ids[0]) == "Tell me about the cat."


# ---- batches -----------------------------------------------------------------------------------


def _set(n, seed):
    return PromptSet([f"p{i}" for i in range(n)], [[i] for i in range(n)], seed)


def test_batch_is_a_pure_function_of_seed_and_step():
    a, b = _set(10, seed=3), _set(10, seed=3)
    for step in (0, 1, 5, 17):
        assert a.batch(step, 4) == b.batch(step, 4)
    # Asking for later steps first does not change earlier ones (no hidden iterator state).
    late_first = _set(10, seed=3)
    late_first.batch(9, 4)
    assert late_first.batch(0, 4) == a.batch(0, 4)


@pytest.mark.parametrize("size", [5, 4, 3])
def test_batch_covers_every_prompt_once_per_epoch(size):
    n = 20
    ps = _set(n, seed=1)
    stream = [t for step in range(3 * n // size + 1) for t in ps.batch(step, size)[0]]
    for epoch in range(3):
        chunk = stream[epoch * n : (epoch + 1) * n]
        assert sorted(chunk) == sorted(ps.texts), f"epoch {epoch}"
    # texts and ids stay paired
    texts, ids = ps.batch(2, size)
    assert [f"p{i[0]}" for i in ids] == texts


def test_batch_is_shuffled_and_epochs_differ():
    ps = _set(30, seed=0)
    epoch0 = ps.batch(0, 30)[0]
    epoch1 = ps.batch(1, 30)[0]
    assert epoch0 != ps.texts  # shuffled (probability 1/30! of a false failure)
    assert epoch0 != epoch1


def test_batch_differs_between_seeds():
    a, b = _set(30, seed=0), _set(30, seed=1)
    assert a.batch(0, 30)[0] != b.batch(0, 30)[0]
    assert sorted(a.batch(0, 30)[0]) == sorted(b.batch(0, 30)[0])


def test_rows_serve_a_fixed_set_in_file_order():
    ps = _set(10, seed=2)
    assert ps.rows(list(range(3))).texts == ["p0", "p1", "p2"]
    assert ps.batch(4, 3) == (ps.draw(4, 3).texts, ps.draw(4, 3).ids)


def test_demo_prompt_set(tokenizer):
    ps = PromptSet.load(DataConfig(prompts="demo", num_demo_prompts=12), tokenizer, seed=0)
    assert len(ps) == 12
    assert all(len(ids) <= 64 for ids in ps.ids)
