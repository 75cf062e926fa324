"""KTO rows {prompt, completion, label}: validation with file:line, the pair layout with the
mismatched completion for the KL estimate, and the synthetic rows of the demo task."""

import json

import pytest

from rayrlhf.data.jsonl import DataError
from rayrlhf.data.kto import check_kto_row, load_kto, mismatched_rows
from rayrlhf.data.synthetic import gold_score, kto_rows, kto_train_and_held_out, preference_pairs


@pytest.fixture(scope="module")
def tokenizer():
    from rayrlhf.models.tiny import train_tokenizer

    return train_tokenizer()


def _row(**fields) -> str:
    base = {"prompt": "Tell me about the cat.", "completion": "it is warm.", "label": True}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}) + "\n"


ROWS = (
    _row()
    + _row(prompt="How is the sea?", completion="the sea is grim and cold.", label=False)
    + _row(prompt="Describe the city.", completion="the city looks bright.", label=True)
)


def _jsonl(tmp_path, text: str):
    path = tmp_path / "kto.jsonl"
    path.write_text(text)
    return path


def test_rows_load_in_the_pair_layout_with_a_mismatched_completion(tmp_path, tokenizer):
    rows = load_kto(_jsonl(tmp_path, ROWS), tokenizer, max_len=64)
    assert len(rows) == 3 and rows.desirable == (True, False, True)
    sides, eos = rows.sides, tokenizer.eos_token_id
    assert tokenizer.decode(sides.chosen_ids[1][:-1]) == "the sea is grim and cold."
    assert all(ids[-1] == eos for ids in sides.chosen_ids)
    # each row's second side is another row's completion: a KL sample, never its own
    others = [sides.chosen_ids.index(ids) for ids in sides.rejected_ids]
    assert all(j != i for i, j in enumerate(others))
    batch = sides.batch([0, 2])
    assert batch.chosen_sequences.shape == batch.rejected_sequences.shape


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        (_row(prompt=...), "missing key 'prompt'"),
        (_row(completion=...), "missing key 'completion'"),
        (_row(label=...), "missing key 'label'"),
        (_row(completion=""), "'completion' is empty"),
        (_row(completion=7), "'completion' must be a string, got int"),
        (_row(label=1), "'label' must be true or false, got int"),
        (_row(label="true"), "'label' must be true or false, got str"),
        (_row(label=None), "'label' must be true or false, got NoneType"),
        ("[1, 2]\n", "expected a JSON object"),
        ("{not json\n", "not valid JSON"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, tokenizer, bad_line, problem):
    path = _jsonl(tmp_path, _row() + "\n" + bad_line + _row())  # the bad row is line 3
    with pytest.raises(DataError) as err:
        load_kto(path, tokenizer, max_len=64)
    assert str(err.value).startswith(f"{path}:3: ") and problem in str(err.value)


def test_skip_leaves_bad_rows_out_and_counts_them(tmp_path, tokenizer):
    path = _jsonl(tmp_path, ROWS + _row(label="yes") + "{oops\n")
    rows = load_kto(path, tokenizer, max_len=64, on_bad_row="skip")
    assert len(rows) == 3 and rows.sides.skipped == 2


def test_over_long_row_and_empty_file_are_errors(tmp_path, tokenizer):
    path = _jsonl(tmp_path, ROWS + _row(completion="warm and kind " * 20))
    with pytest.raises(DataError, match=r":4: prompt \+ completion is \d+ tokens, more than "):
        load_kto(path, tokenizer, max_len=24)
    with pytest.raises(DataError, match="no KTO rows"):
        load_kto(_jsonl(tmp_path, "\n\n"), tokenizer, max_len=64)


def test_the_mismatched_completion_is_cut_to_fit_after_its_prompt(tmp_path, tokenizer):
    long_prompt = "Question: tell me, in a few words, how the weather is today? Answer:"
    text = _row(prompt=long_prompt, completion="ok.") + _row(completion="the day was " * 4)
    rows = load_kto(_jsonl(tmp_path, text), tokenizer, max_len=32)
    sides = rows.sides
    for p, kl in zip(sides.prompt_ids, sides.rejected_ids):
        assert len(p) + len(kl) <= 32
    assert len(sides.rejected_ids[0]) < len(sides.chosen_ids[1])  # row 1's completion, cut


def test_mismatched_rows_skip_rows_of_the_same_prompt():
    prompts = ["a", "a", "b", "b", "c", "c"]
    partner = mismatched_rows(prompts)
    assert partner == mismatched_rows(prompts)  # fixed per file
    assert all(prompts[j] != prompts[i] for i, j in enumerate(partner))
    assert len(set(partner)) > 2  # a random cycle, not one row for all
    assert mismatched_rows(["a", "a"]) in ([1, 0], [0, 1])  # no other prompt: the next row
    assert mismatched_rows(["x"]) == [0]


def test_check_kto_row_returns_the_fields():
    assert check_kto_row(json.loads(_row()), "f:1") == (
        "Tell me about the cat.",
        "it is warm.",
        True,
    )


def test_synthetic_kto_rows_split_each_pair_into_a_desirable_and_an_undesirable_row():
    pairs = preference_pairs(50, seed=2)
    rows = kto_rows(pairs)
    assert len(rows) == 100 and [r["label"] for r in rows[:2]] == [True, False]
    good = [r["completion"] for r in rows if r["label"]]
    bad = [r["completion"] for r in rows if not r["label"]]
    prompts = [r["prompt"] for r in rows if r["label"]]
    assert min(gold_score(prompts, good)) > 0 and max(gold_score(prompts, bad)) == 0
    train, held_out = kto_train_and_held_out(50, 20, seed=2)
    assert len(train) == 100 and len(held_out) == 40
    assert not {r["completion"] for r in train} & {r["completion"] for r in held_out}
