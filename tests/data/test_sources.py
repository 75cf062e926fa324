"""Every loader reads JSONL, parquet, a `save_to_disk` directory and an arrow file alike: the same
rows give the same token ids, a bad row is named by line (JSONL) or row index (parquet, arrow),
and on_bad_row=skip drops and counts it in every format."""

from __future__ import annotations

import json

import pytest
from dataset_files import FORMATS, where, write_rows

from rayrlhf.config import DataConfig
from rayrlhf.data.demonstrations import load_demonstrations
from rayrlhf.data.jsonl import DataError
from rayrlhf.data.preferences import load_preferences
from rayrlhf.data.prompts import PromptSet
from rayrlhf.data.reward_pairs import load_reward_pairs
from rayrlhf.data.sources import read_rows, source_kind


@pytest.fixture(scope="module")
def tok(plain_tok):
    return plain_tok


CHATS = [
    {"messages": [{"role": "user", "content": "Tell me about the cat."}], "answer": "warm"},
    {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Describe the sea:"},
        ],
        "answer": "calm",
    },
]
PAIRS = [
    {"prompt": "Tell me about the cat.", "chosen": "it is warm.", "rejected": "it is cold."},
    {"prompt": "Describe music:", "chosen": "it is kind.", "rejected": "it is grim."},
]


def _prompts(path, tok, **cfg) -> PromptSet:
    return PromptSet.load(DataConfig(prompts=str(path), **cfg), tok, seed=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_chat_prompts_read_the_same_in_every_format(tmp_path, chat_tok, fmt):
    ps = _prompts(write_rows(CHATS, tmp_path, fmt), chat_tok)
    ref = _prompts(write_rows(CHATS, tmp_path / "ref", "jsonl"), chat_tok)
    assert (ps.texts, ps.ids, ps.columns) == (ref.texts, ref.ids, ref.columns)
    assert ps.texts[1] == "<s><|system|>Be kind.\n<|user|>Describe the sea:\n<|assistant|>"
    assert ps.columns == [{"answer": "warm"}, {"answer": "calm"}]


@pytest.mark.parametrize("fmt", FORMATS)
def test_demonstrations_and_pairs_read_the_same_in_every_format(tmp_path, tok, fmt):
    demos = [{"prompt": r["prompt"], "response": r["chosen"]} for r in PAIRS]
    got = load_demonstrations(write_rows(demos, tmp_path, fmt, "demos"), tok, 64)
    ref = load_demonstrations(write_rows(demos, tmp_path / "ref", "jsonl", "demos"), tok, 64)
    assert (got.prompt_ids, got.response_ids) == (ref.prompt_ids, ref.response_ids)
    pairs = load_preferences(write_rows(PAIRS, tmp_path, fmt, "pairs"), tok, 64)
    assert (
        pairs.chosen_ids
        == load_preferences(write_rows(PAIRS, tmp_path / "r", "jsonl"), tok, 64).chosen_ids
    )
    margins = [{**r, "margin": m} for r, m in zip(PAIRS, (1.5, None))]  # null: no margin
    rm = load_reward_pairs(write_rows(margins, tmp_path, fmt, "margins"), tok, 64)
    assert rm.margins == (1.5, 0.0)


BAD_PROMPT_ROWS = [
    ({"messages": [{"role": "user", "content": ""}]}, "messages[0]: 'content' is empty"),
    ({"messages": []}, "'messages' must be a non-empty list of messages"),
    ({"messages": None}, "missing key 'prompt' or 'messages'"),
    (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        "the last message of 'messages' is the assistant's",
    ),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad, problem", BAD_PROMPT_ROWS, ids=range(len(BAD_PROMPT_ROWS)))
def test_a_bad_prompt_row_is_named_by_line_or_row_index(tmp_path, chat_tok, fmt, bad, problem):
    rows = [CHATS[0], CHATS[1], bad, CHATS[0]]
    path = write_rows(rows, tmp_path, fmt)
    with pytest.raises(DataError) as err:
        _prompts(path, chat_tok)
    assert str(err.value).startswith(f"{where(path, fmt, 2)}: "), str(err.value)
    assert problem in str(err.value)
    skipped = _prompts(path, chat_tok, on_bad_row="skip")
    assert (len(skipped), skipped.skipped) == (3, 1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_skip_drops_and_counts_bad_rows_of_every_kind(tmp_path, tok, fmt):
    demos = [
        {"prompt": "Hi", "response": "ok"},
        {"prompt": "", "response": "x"},
        {"prompt": "Hi", "response": "ok"},
    ]
    path = write_rows(demos, tmp_path, fmt, "demos")
    with pytest.raises(DataError, match=rf"^{where(path, fmt, 1)}: 'prompt' is empty"):
        load_demonstrations(path, tok, 64)
    assert load_demonstrations(path, tok, 64, on_bad_row="skip").skipped == 1
    pairs = [PAIRS[0], {**PAIRS[1], "rejected": PAIRS[1]["chosen"]}]
    path = write_rows(pairs, tmp_path, fmt, "pairs")
    with pytest.raises(DataError, match=rf"^{where(path, fmt, 1)}: 'chosen' and 'rejected'"):
        load_preferences(path, tok, 64)
    assert load_preferences(path, tok, 64, on_bad_row="skip").skipped == 1
    assert load_reward_pairs(path, tok, 64, on_bad_row="skip").skipped == 1


def test_overlong_rows_are_named_by_row_index(tmp_path, tok):
    path = write_rows([{"prompt": "hi"}, {"prompt": "the sea is calm " * 30}], tmp_path, "parquet")
    with pytest.raises(DataError, match=rf"^{path} row 1: prompt has \d+ tokens"):
        _prompts(path, tok, max_prompt_tokens=16)
    assert _prompts(path, tok, max_prompt_tokens=16, overlong="drop").dropped == 1


def test_a_column_absent_from_a_row_reads_as_none_and_other_columns_stay(tmp_path, tok):
    rows = [{"prompt": "Describe music:", "answer": "4"}, {"messages": CHATS[0]["messages"]}]
    ps = _prompts(write_rows(rows, tmp_path, "parquet"), tok)
    assert ps.texts == ["Describe music:", "Tell me about the cat."]
    # parquet has one schema for all rows: each row carries every column, None where unset
    assert ps.columns == [{"messages": None, "answer": "4"}, {"prompt": None, "answer": None}]


def test_source_kind(tmp_path):
    (tmp_path / "d").mkdir()
    kinds = [source_kind(tmp_path / n) for n in ("a.jsonl", "a.json", "a.PARQUET", "a.arrow", "d")]
    assert kinds == ["jsonl", "jsonl", "parquet", "arrow", "saved"]


def test_a_dataset_dict_asks_for_one_split(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(PAIRS)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict \(splits: train, test\).*dd/train"):
        read_rows(tmp_path / "dd", lambda row, where: row)


@pytest.mark.parametrize("name", ["broken.parquet", "broken.arrow", "not_a_dataset"])
def test_unreadable_files_are_data_errors_naming_them(tmp_path, name):
    path = tmp_path / name
    if name == "not_a_dataset":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    else:
        path.write_bytes(b"PAR1 this is not a real file")
    # A plain directory is named as one before any reader sees it (no raw IsADirectoryError).
    what = "is a directory, not a data file" if name == "not_a_dataset" else "cannot be read as"
    with pytest.raises(DataError, match=rf"^{path}: {what}"):
        read_rows(path, lambda row, where: row)


def test_an_empty_dataset_is_an_error_naming_it(tmp_path):
    import datasets

    empty = datasets.Dataset.from_dict({"prompt": []})
    empty.to_parquet(str(tmp_path / "empty.parquet"))
    # datasets itself refuses both ("corresponds to no data", an IndexError): named, exit 2
    with pytest.raises(DataError, match=rf"^{tmp_path / 'empty.parquet'}: cannot be read"):
        read_rows(tmp_path / "empty.parquet", lambda row, where: row, what="prompts")
    empty.save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError, match=rf"^{tmp_path / 'empty'}: .*is it empty"):
        read_rows(tmp_path / "empty", lambda row, where: row, what="prompts")


def test_parquet_reading_leaves_no_cache_behind(tmp_path, tok, monkeypatch):
    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    _prompts(write_rows(PAIRS, tmp_path, "parquet"), tok)
    assert not any(cache.rglob("*.arrow"))


def test_jsonl_keeps_line_numbers_where_a_schema_reader_would_fail(tmp_path, tok):
    """A field that is text in one row and a number in another: the whole-file schema of
    `datasets`' JSON loader fails on it; the byte-level reader names the row."""
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "answer": "4"}) + "\n" + '{"prompt": 5}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: 'prompt' must be text"):
        _prompts(path, tok)
    assert _prompts(path, tok, on_bad_row="skip").columns == [{"answer": "4"}]
