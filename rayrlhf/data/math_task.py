"""The arithmetic task: a verifiable reward in GSM8K's format that a tiny model learns on CPU.

A row is {"question": "What is 7 + 5 - 3?", "answer": "7 + 5 = 12. 12 - 3 = 9. #### 9"}: the
answer is a worked solution, one operation per sentence, ending in `#### <number>` as GSM8K's
answers do. Operands are drawn from 0..`max_operand`, operations from `ops`; `difficulty` is
the number of operations. Intermediate results stay non-negative. A product wraps what comes
before it in parentheses, so left-to-right order is the order of evaluation.

    generate        seeded unique problems; `split` gives held-out / SFT / RL sets that share none
    final_number    the number a response ends on: after its last `####`, else its last number
    reward          the verifier as a reward function (rows[i]["answer"] is the reference):
                    {"score", "accuracy", "format_ok"} per response

`python -m rayrlhf.data.math_task OUT_DIR` writes the committed data/math files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from fractions import Fraction
from pathlib import Path

OPS = ("+", "-")
"""Default operations; "*" is accepted too (operands then kept small by `max_operand`)."""
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
"""A number: an optional sign, digits with or without thousands commas, an optional decimal
part. "12." is 12 followed by a full stop."""
_NUMBER_RE = re.compile(_NUMBER)
_MARKED_RE = re.compile(r"####\s*\$?\s*(" + _NUMBER + r")")
_STRICT_RE = re.compile(r"####\s(" + _NUMBER + r")\s*\.?\s*$")
"""A well-formatted ending: `#### n` and at most a full stop after it."""
FORMAT_BONUS = 0.0
"""Weight of format_ok in the score; 0: SFT already teaches the format, and a pure 0/1 score
keeps the figure GRPO optimises equal to held-out accuracy."""


def make_problem(
    rng: random.Random, difficulty: int = 2, max_operand: int = 9, ops: tuple[str, ...] = OPS
) -> dict[str, str]:
    """One {question, answer} row with `difficulty` operations (see the module docstring)."""
    if difficulty < 1:
        raise ValueError(f"difficulty must be >= 1, got {difficulty}")
    value = rng.randint(0, max_operand)
    expr, steps = str(value), []
    for _ in range(difficulty):
        op = rng.choice(ops)
        operand = rng.randint(0, min(value, max_operand) if op == "-" else max_operand)
        result = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
        if op == "*" and len(steps) > 0:
            expr = f"({expr})"
        expr = f"{expr} {op} {operand}"
        steps.append(f"{value} {op} {operand} = {result}.")
        value = result
    return {"question": f"What is {expr}?", "answer": " ".join(steps) + f" #### {value}"}


def generate(
    n: int, seed: int = 0, difficulty: int = 2, max_operand: int = 9, ops: tuple[str, ...] = OPS
) -> list[dict[str, str]]:
    """`n` problems with distinct questions, a pure function of the arguments."""
    rng, seen, rows = random.Random(seed), set(), []
    for _ in range(n * 100):
        row = make_problem(rng, difficulty, max_operand, ops)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
            if len(rows) == n:
                return rows
    raise ValueError(
        f"only {len(rows)} distinct problems at difficulty {difficulty}, "
        f"max_operand {max_operand}; asked for {n}"
    )


def split(sizes: dict[str, int], seed: int = 0, **task) -> dict[str, list[dict[str, str]]]:
    """Disjoint sets of problems, e.g. {"heldout": 200, "sft": 1500, "train": 800}: no
    question is in two sets. `task` is `generate`'s difficulty, max_operand, ops."""
    rows = generate(sum(sizes.values()), seed, **task)
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = rows[start : start + size]
        start += size
    return out


def _value(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def final_number(response: str) -> Fraction | None:
    """The value a response ends on: the number after its last `####` if it has one (None if
    no number follows), else its last number; None if it has none. Commas, "$", a full stop or
    spaces around the number are tolerated; the value is compared exactly (12.0 == 12)."""
    if "####" in response:
        tail = response[response.rindex("####") :]
        found = _MARKED_RE.match(tail)
        return _value(found.group(1)) if found else None
    numbers = _NUMBER_RE.findall(response)
    return _value(numbers[-1]) if numbers else None


def reference_number(answer: str) -> Fraction:
    """The value after `####` in a GSM8K answer string; a clear error if it has none."""
    value = final_number(answer) if "####" in answer else None
    if value is None:
        raise ValueError(f"reference answer has no '#### <number>': {answer!r}")
    return value


def format_ok(response: str) -> bool:
    """Ends on `#### <number>` (an optional full stop after it), as GSM8K answers do."""
    return _STRICT_RE.search(response.strip()) is not None


def reward(prompts: list[str], responses: list[str], rows: list[dict]) -> list[dict[str, float]]:
    """Per response {"score", "accuracy", "format_ok"}: accuracy 1.0 when its final number equals
    the `####` number of rows[i]["answer"]; score = accuracy + FORMAT_BONUS * format_ok."""
    del prompts  # the reference travels in the row
    out = []
    for response, row in zip(responses, rows, strict=True):
        if "answer" not in row:
            raise KeyError(f"row has no 'answer' column (columns: {sorted(row)})")
        correct = float(final_number(response) == reference_number(str(row["answer"])))
        fmt = float(format_ok(response))
        out.append({"score": correct + FORMAT_BONUS * fmt, "accuracy": correct, "format_ok": fmt})
    return out


def write_task_files(
    out_dir: str | Path,
    seed: int = 0,
    heldout: int = 200,
    sft: int = 1500,
    train: int = 800,
    **task,
) -> dict[str, Path]:
    """heldout.jsonl and train.jsonl ({question, answer} prompt rows) and sft.jsonl ({prompt,
    response} demonstrations) under `out_dir`, from disjoint problems."""
    sets = split({"heldout": heldout, "sft": sft, "train": train}, seed, **task)
    sets["sft"] = [{"prompt": r["question"], "response": r["answer"]} for r in sets["sft"]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in sets.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def main(argv: list[str] | None = None) -> None:
    """`python -m rayrlhf.data.math_task OUT_DIR [--difficulty N ...]`."""
    ap = argparse.ArgumentParser(description="Write the arithmetic task's JSONL files.")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--difficulty", type=int, default=2, help="operations per problem")
    ap.add_argument("--max-operand", type=int, default=9)
    ap.add_argument("--ops", default="".join(OPS), help="operations to draw from, e.g. '+-*'")
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--sft", type=int, default=1500)
    ap.add_argument("--train", type=int, default=800)
    a = ap.parse_args(argv)
    paths = write_task_files(
        a.out_dir, a.seed, a.heldout, a.sft, a.train,
        difficulty=a.difficulty, max_operand=a.max_operand, ops=tuple(a.ops),
    )  # fmt: skip
    for name, path in paths.items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
