import json
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest

from rayrlhf.data import math_task
from rayrlhf.data.math_task import final_number, format_ok, generate, make_problem, reward, split

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "math"
STEP = re.compile(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)\.")


def _expression(question: str) -> str:
    assert question.startswith("What is ") and question.endswith("?"), question
    return question[len("What is ") : -1]


@pytest.mark.parametrize("difficulty", [1, 2, 3])
@pytest.mark.parametrize("ops", [("+", "-"), ("+", "-", "*")])
def test_problems_are_gsm8k_rows_whose_worked_steps_are_right(difficulty, ops):
    for row in generate(100, seed=3, difficulty=difficulty, max_operand=9, ops=ops):
        assert set(row) == {"question", "answer"}
        expected = eval(_expression(row["question"]))  # our own arithmetic text, nothing else
        body, final = row["answer"].split(" #### ")
        assert int(final) == expected and format_ok(row["answer"])
        steps = STEP.findall(body)
        assert len(steps) == difficulty, row
        value = None
        for a, op, b, result in steps:
            assert value is None or int(a) == value, row  # each step starts from the last
            assert eval(f"{a} {op} {b}") == int(result) >= 0, row
            value = int(result)
        assert value == expected


def test_generation_is_seeded_distinct_and_split_disjoint():
    assert generate(50, seed=1) == generate(50, seed=1)
    assert generate(50, seed=1) != generate(50, seed=2)
    questions = [r["question"] for r in generate(500, seed=1)]
    assert len(set(questions)) == 500
    sets = split({"a": 100, "b": 200, "c": 50}, seed=1)
    assert [len(v) for v in sets.values()] == [100, 200, 50]
    seen = [{r["question"] for r in rows} for rows in sets.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_difficulty_knob_and_its_limits():
    rng = random.Random(0)
    assert make_problem(rng, difficulty=4)["answer"].count("=") == 4
    with pytest.raises(ValueError, match="difficulty"):
        make_problem(rng, difficulty=0)
    with pytest.raises(ValueError, match="distinct problems"):
        generate(500, difficulty=1, max_operand=3)  # only a few dozen such problems exist


@pytest.mark.parametrize(
    "response, value",
    [
        ("5 + 7 = 12. #### 12", 12),
        ("#### 12", 12),
        ("####12", 12),
        ("#### 12.", 12),
        ("#### $12", 12),
        ("the answer is 12.", 12),
        ("so x = 12", 12),
        ("  12  ", 12),
        ("#### 1,234", 1234),
        ("it is 1,234.", 1234),
        ("#### -3", -3),
        ("#### 12.0", 12),
        ("#### 2.5", Fraction(5, 2)),
        ("#### 12 #### 13", 13),  # the last marker counts
        ("#### 12, not 13", 12),  # after a marker, its number
        ("3 + 4 = 7 then 8", 8),  # without one, the last number
    ],
)
def test_final_number_tolerates_formatting(response, value):
    assert final_number(response) == value


@pytest.mark.parametrize("response", ["", "no number here", "#### ", "7 + 5 = 12. ####", "####x"])
def test_final_number_none_without_a_number(response):
    assert final_number(response) is None


@pytest.mark.parametrize(
    "response, ok",
    [("7 = 7. #### 7", True), ("#### 7.", True), ("#### 7 ", True), ("####7", False),
     ("7", False), ("#### 7 and more", False), ("", False)],
)  # fmt: skip
def test_format_ok_wants_a_final_marked_number(response, ok):
    assert format_ok(response) is ok


def test_reward_reads_the_reference_from_the_row_and_is_strict_on_the_value():
    rows = [{"answer": "3 + 9 = 12. #### 12"}] * 5
    responses = ["3 + 9 = 12. #### 12", "the answer is 12.", "#### 13", "#### 12.5", "twelve"]
    # The prompt says 13 to show that the reference comes from the row, not the prompt.
    out = reward(["What is 3 + 10?"] * 5, responses, rows)
    assert [r["accuracy"] for r in out] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert [r["format_ok"] for r in out] == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert [r["score"] for r in out] == [1.0, 1.0, 0.0, 0.0, 0.0]  # FORMAT_BONUS is 0
    assert out[0] == {"score": 1.0, "accuracy": 1.0, "format_ok": 1.0}
    other = reward(["q"], ["#### 12"], [{"answer": "1,000 + 2 = 1,002 #### 1,002", "id": 4}])
    assert other[0]["accuracy"] == 0.0


def test_reward_format_bonus_adds_to_the_score(monkeypatch):
    monkeypatch.setattr(math_task, "FORMAT_BONUS", 0.1)
    out = reward(["q", "q"], ["#### 5", "5"], [{"answer": "#### 4"}, {"answer": "#### 5"}])
    assert [r["score"] for r in out] == [pytest.approx(0.1), 1.0]


def test_reward_errors_name_the_problem():
    with pytest.raises(KeyError, match="no 'answer' column"):
        reward(["q"], ["#### 1"], [{"question": "q"}])
    with pytest.raises(ValueError, match="no '#### <number>'"):
        reward(["q"], ["#### 1"], [{"answer": "one"}])
    with pytest.raises(ValueError):
        reward(["q", "q"], ["#### 1", "#### 2"], [{"answer": "#### 1"}])  # one row short


def test_tiny_tokenizer_reads_the_task_without_unknown_tokens(plain_tok):
    text = "What is (12 - 3) * 4 + 5? 12 - 3 = 9. 9 * 4 = 36. 36 + 5 = 41. #### 1,041"
    ids = plain_tok(text, add_special_tokens=False)["input_ids"]
    assert plain_tok.unk_token_id not in ids
    assert plain_tok.decode(ids) == text


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_committed_data_is_what_the_generator_writes_and_heldout_is_unseen(tmp_path):
    sizes = {name: len(_rows(DATA / f"{name}.jsonl")) for name in ("heldout", "sft", "train")}
    assert sum((DATA / f"{n}.jsonl").stat().st_size for n in sizes) < 300_000
    written = math_task.write_task_files(tmp_path, **sizes)  # the defaults made the files
    for name, path in written.items():
        assert path.read_text() == (DATA / f"{name}.jsonl").read_text(), name
    heldout = {r["question"] for r in _rows(DATA / "heldout.jsonl")}
    assert not heldout & {r["prompt"] for r in _rows(DATA / "sft.jsonl")}
    assert not heldout & {r["question"] for r in _rows(DATA / "train.jsonl")}


def test_committed_data_loads_as_prompts_and_demonstrations(plain_tok):
    from rayrlhf.config import DataConfig
    from rayrlhf.data.demonstrations import load_demonstrations
    from rayrlhf.data.prompts import PromptSet

    cfg = DataConfig(prompts=str(DATA / "train.jsonl"), prompt_key="question")
    prompts = PromptSet.load(cfg, plain_tok, seed=0)
    batch = prompts.rows([0, 1])
    assert batch.texts[0].startswith("What is ") and set(batch.columns[0]) == {"answer"}
    assert [r["accuracy"] for r in reward(batch.texts, ["x"] * 2, batch.columns)] == [0.0] * 2
    right = [c["answer"] for c in batch.columns]
    assert [r["accuracy"] for r in reward(batch.texts, right, batch.columns)] == [1.0] * 2
    demos = load_demonstrations(DATA / "sft.jsonl", plain_tok, max_len=64)
    assert len(demos) == len(_rows(DATA / "sft.jsonl"))
    assert plain_tok.unk_token_id not in {i for r in demos.response_ids for i in r}
