import json

import pytest
import torch
from dataset_files import plain

from rayrlhf.data.jsonl import DataError, read_jsonl
from rayrlhf.data.preferences import check_preference_row, load_preferences


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return plain(AutoTokenizer.from_pretrained(tiny_models["policy"]))  # raw prompts


def _jsonl(tmp_path, data: bytes | str, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


GOOD = (
    json.dumps(
        {"prompt": "Tell me about the cat.", "chosen": "it is warm.", "rejected": "it is cold."}
    )
    + "\n"
)
LONGER = (
    json.dumps(
        {
            "prompt": "Question: how is the weather? Answer:",
            "chosen": "the day was bright and kind.",
            "rejected": "it is grim.",
            "id": 7,  # extra keys are allowed
        }
    )
    + "\n"
)


def test_reads_rows_with_line_numbers_skipping_blank_lines(tmp_path):
    path = _jsonl(tmp_path, GOOD + "\n" + LONGER)
    rows, _ = read_jsonl(path, check_preference_row)
    assert [r[0] for r in rows] == [1, 3]
    assert rows[0][1] == ("Tell me about the cat.", "it is warm.", "it is cold.")


def _row(**fields) -> str:
    base = {"prompt": "p", "chosen": "a", "rejected": "b"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...})


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        (_row(prompt=...), "missing key 'prompt'"),
        (_row(chosen=...), "missing key 'chosen'"),
        (_row(rejected=...), "missing key 'rejected'"),
        (_row(chosen=3), "'chosen' must be a string, got int"),
        (_row(rejected=None), "'rejected' must be a string, got NoneType"),
        (_row(prompt=["p"]), "'prompt' must be a string, got list"),
        (_row(prompt=""), "'prompt' is empty"),
        (_row(chosen="  "), "'chosen' is empty"),
        (_row(rejected=""), "'rejected' is empty"),
        (_row(chosen="same", rejected="same"), "'chosen' and 'rejected' are identical"),
        ('["p", "a", "b"]', "expected a JSON object"),
        ('{"prompt": "unterminated}', "not valid JSON"),
        ("not json at all", "not valid JSON"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, tokenizer, bad_line, problem):
    path = _jsonl(tmp_path, GOOD + "\n" + bad_line + "\n" + GOOD)  # the bad row is line 3
    with pytest.raises(DataError) as err:
        load_preferences(path, tokenizer, max_len=64)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: "), msg
    assert problem in msg


def test_invalid_utf8_names_its_line(tmp_path, tokenizer):
    bad = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
    path = _jsonl(tmp_path, GOOD.encode() + GOOD.encode() + bad)
    with pytest.raises(DataError, match=rf"^{path}:3: invalid UTF-8"):
        load_preferences(path, tokenizer, max_len=64)


@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_over_long_pair_names_line_side_and_limit(tmp_path, tokenizer, side):
    long_row = _row(prompt="Tell me about the cat.", **{side: "warm and kind " * 20})
    path = _jsonl(tmp_path, GOOD + long_row + "\n")
    with pytest.raises(DataError) as err:
        load_preferences(path, tokenizer, max_len=24)
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: prompt + {side} is ") and "data.max_len=24" in msg


def test_empty_file_is_an_error(tmp_path, tokenizer):
    path = _jsonl(tmp_path, "\n  \n")
    with pytest.raises(DataError, match="no preference pairs"):
        load_preferences(path, tokenizer, max_len=64)


def test_batch_layout_left_pads_prompts_and_right_pads_both_responses(tmp_path, tokenizer):
    pairs = load_preferences(_jsonl(tmp_path, GOOD + LONGER), tokenizer, max_len=64)
    assert len(pairs) == 2
    eos = tokenizer.eos_token_id
    assert all(ids[-1] == eos for ids in pairs.chosen_ids + pairs.rejected_ids)
    batch = pairs.batch([1, 0])
    p = max(len(ids) for ids in pairs.prompt_ids)
    r = max(len(ids) for ids in pairs.chosen_ids + pairs.rejected_ids)
    for side in ("chosen", "rejected"):
        seq = getattr(batch, f"{side}_sequences")
        attn = getattr(batch, f"{side}_attention_mask")
        action = getattr(batch, f"{side}_action_mask")
        assert seq.shape == attn.shape == (2, p + r) and action.shape == (2, r)
        assert seq.dtype == attn.dtype == torch.long and action.dtype == torch.float32
        assert torch.equal(attn[:, p:].float(), action)  # the action mask covers response columns
        for row, i in enumerate([1, 0]):
            prompt, resp = pairs.prompt_ids[i], getattr(pairs, f"{side}_ids")[i]
            # the prompt ends at column P; the response starts there
            assert seq[row, p - len(prompt) : p].tolist() == list(prompt)
            assert attn[row, : p - len(prompt)].sum() == 0
            assert seq[row, p : p + len(resp)].tolist() == list(resp)
            assert action[row].sum() == len(resp)
    seqs, attn, action = batch.stacked()
    assert seqs.shape == (4, p + r) and action.shape == (4, r)
    assert torch.equal(seqs[:2], batch.chosen_sequences)
    assert tokenizer.decode(pairs.chosen_ids[0][:-1]) == "it is warm."


def test_order_is_a_reproducible_permutation(tmp_path, tokenizer):
    pairs = load_preferences(_jsonl(tmp_path, GOOD + LONGER + GOOD), tokenizer, max_len=64)
    assert sorted(pairs.order(0, seed=1)) == [0, 1, 2]
    assert pairs.order(3, seed=1) == pairs.order(3, seed=1)
