import json

import pytest

from rayrlhf.data.demo_task import GOOD_WORDS
from rayrlhf.data.synthetic import (
    BAD_WORDS,
    gold_score,
    preference_pairs,
    train_and_held_out,
    write_jsonl,
)


def test_pairs_are_reproducible_and_well_formed():
    rows = preference_pairs(200, seed=3)
    assert rows == preference_pairs(200, seed=3)
    assert rows != preference_pairs(200, seed=4)
    assert len(rows) == 200
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert all(isinstance(v, str) and v.strip() for v in row.values())
        assert row["chosen"] != row["rejected"]


def test_chosen_uses_kind_words_and_rejected_never_does():
    assert not GOOD_WORDS & BAD_WORDS
    rows = preference_pairs(300, seed=0)
    prompts = [r["prompt"] for r in rows]
    chosen = gold_score(prompts, [r["chosen"] for r in rows])
    rejected = gold_score(prompts, [r["rejected"] for r in rows])
    assert min(chosen) > 0
    assert max(rejected) == 0
    assert any(w in r["rejected"] for r in rows for w in BAD_WORDS)


def test_responses_are_short_with_the_tiny_tokenizer(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    rows = preference_pairs(500, seed=0)
    lengths = [len(tok(r[k])["input_ids"]) for r in rows for k in ("chosen", "rejected")]
    assert max(lengths) <= 16, max(lengths)


def test_held_out_responses_never_occur_in_training():
    train, held_out = train_and_held_out(500, 100, seed=0)
    assert len(train) == 500 and len(held_out) == 100
    seen = {r[k] for r in train for k in ("chosen", "rejected")}
    assert not seen & {r[k] for r in held_out for k in ("chosen", "rejected")}


@pytest.mark.parametrize("n", [1, 7])
def test_write_jsonl_round_trips(tmp_path, n):
    rows = preference_pairs(n, seed=1)
    path = write_jsonl(rows, tmp_path / "sub" / "pairs.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
