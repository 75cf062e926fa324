"""Reward-model pairs: the DPO row checks, the optional margin column, skip mode, batches."""

from __future__ import annotations

import json

import pytest
import torch
from dataset_files import plain
from transformers import AutoTokenizer

from rayrlhf.data.jsonl import DataError
from rayrlhf.data.reward_pairs import load_reward_pairs


@pytest.fixture(scope="module")
def tok(tiny_models):
    return plain(AutoTokenizer.from_pretrained(tiny_models["reward"]))  # raw prompts


def _pair(**extra) -> str:
    return json.dumps({"prompt": "Describe music:", "chosen": "it is warm.",
                       "rejected": "it is cold.", **extra})  # fmt: skip


def _write(tmp_path, lines):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_margin_column_is_optional_and_batched(tok, tmp_path):
    pairs = load_reward_pairs(_write(tmp_path, [_pair(), _pair(margin=1.5), _pair()]), tok, 64)
    assert pairs.margins == (0.0, 1.5, 0.0)
    batch = pairs.batch([1, 0, 1], real=2)
    assert batch.margin.tolist() == [1.5, 0.0, 1.5]
    assert batch.weight.tolist() == [1.0, 1.0, 0.0]  # the repeat only pads a shard
    seqs, attn = batch.stacked()
    assert seqs.shape[0] == 6 and torch.equal(seqs[:3], batch.chosen_sequences)
    assert torch.equal(attn[3:], batch.rejected_attention_mask)


@pytest.mark.parametrize(
    "line,reason",
    [
        (_pair(margin="big"), "'margin' must be a number, got str"),
        (_pair(margin=True), "'margin' must be a number, got bool"),
        (json.dumps({"prompt": "x", "chosen": "a", "rejected": "a"}), "identical"),
        (json.dumps({"prompt": "x", "chosen": "a"}), "missing key 'rejected'"),
        (json.dumps({"prompt": "x " * 70, "chosen": "a", "rejected": "b"}), "data.max_len=64"),
    ],
)
def test_bad_pair_names_file_line(tok, tmp_path, line, reason):
    path = _write(tmp_path, [_pair(), line])
    with pytest.raises(DataError, match=rf"{path}:2: .*{reason}"):
        load_reward_pairs(path, tok, 64)


def test_non_finite_margin(tok, tmp_path):
    path = _write(tmp_path, [_pair(), _pair().replace("}", ', "margin": NaN}')])
    with pytest.raises(DataError, match=rf"{path}:2: 'margin' must be finite"):
        load_reward_pairs(path, tok, 64)


def test_skip_mode_drops_and_counts(tok, tmp_path):
    path = _write(tmp_path, [_pair(), _pair(margin="x"), "{oops", _pair()])
    pairs = load_reward_pairs(path, tok, 64, on_bad_row="skip")
    assert (len(pairs), pairs.skipped) == (2, 2)
