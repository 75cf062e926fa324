import json

import pytest

from rayrlhf.config import DataConfig
from rayrlhf.data.jsonl import DataError
from rayrlhf.data.prompts import PromptSet, read_jsonl_prompts


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["policy"])


def _jsonl(tmp_path, data: bytes | str, name="p.jsonl"):
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


GOOD = '{"prompt": "Tell me about the cat."}\n'


def test_reads_prompts_with_line_numbers_skipping_blank_lines(tmp_path):
    path = _jsonl(tmp_path, GOOD + "\n" + '{"prompt": "Describe the sea:", "id": 7}\n')
    assert read_jsonl_prompts(path, "prompt") == [
        (1, "Tell me about the cat."),
        (3, "Describe the sea:"),
    ]


def test_custom_key(tmp_path):
    path = _jsonl(tmp_path, '{"q": "hello"}\n')
    assert read_jsonl_prompts(path, "q") == [(1, "hello")]


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ('{"text": "no prompt key"}', "missing key 'prompt'"),
        ('["prompt"]', "expected a JSON object"),
        ('{"prompt": 17}', "'prompt' must be a string, got int"),
        ('{"prompt": ""}', "'prompt' is empty"),
        ('{"prompt": "   "}', "'prompt' is empty"),
        ('{"prompt": "unterminated}', "not valid JSON"),
        ("not json at all", "not valid JSON"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, bad_line, problem):
    path = _jsonl(tmp_path, GOOD + "\n" + bad_line + "\n" + GOOD)  # bad row is on line 3
    with pytest.raises(DataError) as err:
        read_jsonl_prompts(path, "prompt")
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: "), msg
    assert problem in msg


def test_invalid_utf8_on_line_3(tmp_path):
    latin1_row = b'{"prompt": "caf\xe9 au lait"}\n'  # 0xe9 alone is not UTF-8
    path = _jsonl(tmp_path, GOOD.encode() * 2 + latin1_row + GOOD.encode())
    with pytest.raises(DataError) as err:
        read_jsonl_prompts(path, "prompt")
    assert str(err.value).startswith(f"{path}:3: ")
    assert "UTF-8" in str(err.value)


def test_truncated_last_line(tmp_path):
    path = _jsonl(tmp_path, GOOD + GOOD + '{"prompt": "cut off"')  # no closing brace, no newline
    with pytest.raises(DataError) as err:
        read_jsonl_prompts(path, "prompt")
    assert str(err.value).startswith(f"{path}:3: ")
    assert "truncated last line" in str(err.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = _jsonl(tmp_path, content)
    with pytest.raises(DataError) as err:
        read_jsonl_prompts(path, "prompt")
    assert str(path) in str(err.value)
    assert "no prompts" in str(err.value)


def test_unicode_line_separator_inside_a_prompt(tmp_path):
    rows = [{"prompt": "first line\u2028second line"}, {"prompt": "next"}]
    path = _jsonl(tmp_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert read_jsonl_prompts(path, "prompt") == [(1, "first line\u2028second line"), (2, "next")]


# ---- PromptSet ---------------------------------------------------------------------------------


def test_too_long_prompt_names_file_and_line(tmp_path, tokenizer):
    long_prompt = " ".join(["the weather is calm"] * 20)
    n_tokens = len(tokenizer(long_prompt)["input_ids"])
    limit = 16
    assert n_tokens > limit
    path = _jsonl(tmp_path, GOOD + json.dumps({"prompt": long_prompt}) + "\n")
    cfg = DataConfig(prompts=str(path), max_prompt_tokens=limit)
    with pytest.raises(DataError) as err:
        PromptSet.load(cfg, tokenizer, seed=0)
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: ")
    assert str(n_tokens) in msg
    assert "data.max_prompt_tokens=16" in msg


def test_load_tokenizes_jsonl(tmp_path, tokenizer):
    path = _jsonl(tmp_path, GOOD + '{"prompt": "Describe the sea:"}\n')
    ps = PromptSet.load(DataConfig(prompts=str(path)), tokenizer, seed=0)
    assert ps.texts == ["Tell me about the cat.", "Describe the sea:"]
    assert ps.ids[1] == tokenizer("Describe the sea:")["input_ids"]
    assert tokenizer.decode(ps.ids[0]) == "Tell me about the cat."


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


def test_demo_prompt_set(tokenizer):
    ps = PromptSet.load(DataConfig(prompts="demo", num_demo_prompts=12), tokenizer, seed=0)
    assert len(ps) == 12
    assert all(len(ids) <= 64 for ids in ps.ids)
