"""The reward actor's class, in-process: rules see exactly their dataset rows (JSONL and
parquet), terms combine with weights, invalid scores are masked, and a reward model with a
tokenizer of its own reads ids from that tokenizer."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
from transformers import AutoTokenizer

from rayrlhf.algorithms.experience import assemble_rollout
from rayrlhf.config import DataConfig, RewardConfig
from rayrlhf.data.prompts import PromptSet
from rayrlhf.types import Sample
from rayrlhf.workers.reward import RetokenizedRM, RewardWorker

ROWS = [
    {"prompt": "the good day", "answer": "12", "level": 1, "tags": ["a", "b"]},
    {"prompt": "a bad night", "answer": "7", "level": 2, "tags": []},
    {"prompt": "the day is", "answer": "3,000", "level": 3, "tags": ["c"]},
]


@pytest.fixture
def recorder(monkeypatch):
    """A user module `rows_rule` whose `rule` records what it was called with."""
    mod = types.ModuleType("rows_rule")
    mod.calls = []

    def rule(prompts, responses, rows):
        mod.calls.append((prompts, responses, rows))
        return [{"score": float(len(r["answer"])), "level": float(r["level"])} for r in rows]

    mod.rule = rule
    mod.bad = lambda prompts, responses, rows: [None if "bad" in p else 1.0 for p in prompts]
    monkeypatch.setitem(sys.modules, "rows_rule", mod)
    return mod


def _write(fmt: str, directory) -> str:
    if fmt == "jsonl":
        path = directory / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    else:
        import datasets

        path = directory / "rows.parquet"
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    return str(path)


def _samples(prompt_ids: list[list[int]]) -> list[Sample]:
    return [Sample(list(p), [5, 6], [0.0, 0.0], "is good") for p in prompt_ids]


@pytest.fixture(scope="module")
def policy_tok(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["policy"])


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_rule_sees_exactly_its_rows_columns(recorder, policy_tok, tmp_path, fmt):
    data = DataConfig(prompts=_write(fmt, tmp_path), chat_template="off")
    drawn = PromptSet.load(data, policy_tok, seed=3).draw(step=0, size=3, repeat=2)
    rollout = assemble_rollout(_samples(drawn.ids), drawn.texts, 0, drawn.columns)
    out = RewardWorker(RewardConfig(rule="rows_rule:rule"), num_threads=1).score(rollout).value

    (prompts, responses, rows), = recorder.calls  # fmt: skip
    by_prompt = {r["prompt"]: r for r in ROWS}
    assert len(rows) == 6 and prompts == list(drawn.texts) and responses == ["is good"] * 6
    for text, row in zip(prompts, rows):
        expected = {k: v for k, v in by_prompt[text].items() if k != "prompt"}
        assert row == expected  # every other column, unchanged; nothing added
        assert list(row) == ["answer", "level", "tags"]
    assert out.scores.tolist() == [float(len(r["answer"])) for r in rows]
    assert out.extras["level"].tolist() == [float(r["level"]) for r in rows]
    assert out.valid.all()


def test_demo_prompts_give_empty_rows(recorder, policy_tok):
    drawn = PromptSet.load(DataConfig(num_demo_prompts=4), policy_tok, seed=0).draw(0, 2)
    rollout = assemble_rollout(_samples(drawn.ids), drawn.texts, 0, drawn.columns)
    mod = sys.modules["rows_rule"]
    mod.rule2 = lambda p, r, rows: [float(row == {}) for row in rows]
    out = RewardWorker(RewardConfig(rule="rows_rule:rule2"), 1).score(rollout).value
    assert out.scores.tolist() == [1.0, 1.0]


def test_terms_combine_with_weights_and_invalid_samples_are_masked(recorder, tiny_models):
    prompts = ["the good day", "a bad night"]
    rollout = assemble_rollout(_samples([[1, 2], [3]]), prompts, 0, [ROWS[0], ROWS[1]])
    cfg = RewardConfig(
        model_path=str(tiny_models["reward"]), model_weight=0.5,
        rules=[{"fn": "rows_rule:bad", "weight": 2.0}],
    )  # fmt: skip
    worker = RewardWorker(cfg, 1, policy_path=str(tiny_models["policy"]))
    assert worker.retokenize is None  # the same tokenizer: the policy's ids are read as they are
    out = worker.score(rollout).value
    rm = worker.model_scores(rollout)
    assert out.valid.tolist() == [True, False]
    assert out.scores[0].item() == pytest.approx(0.5 * rm[0].item() + 2.0)
    assert out.scores[1].item() == 0.0 and out.summary()["invalid"] == 1.0


def test_nan_from_the_reward_model_is_an_invalid_sample(tiny_models):
    worker = RewardWorker(RewardConfig(model_path=str(tiny_models["reward"])), 1)
    worker.model_scores = lambda rollout: torch.tensor([math.nan, 1.0])
    rollout = assemble_rollout(_samples([[1], [2]]), ["a", "b"], 0)
    out = worker.score(rollout).value
    assert out.valid.tolist() == [False, True] and out.scores.tolist() == [0.0, 1.0]


@pytest.fixture(scope="module")
def qwen2_models(tmp_path_factory):
    from rayrlhf.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("qwen2_models"), family="qwen2")


def test_reward_model_with_its_own_tokenizer_reads_its_own_ids(
    tiny_models, qwen2_models, policy_tok
):
    rm_tok = AutoTokenizer.from_pretrained(qwen2_models["reward"])
    assert rm_tok.get_vocab() != policy_tok.get_vocab() and rm_tok.chat_template
    prompts, responses = ["the good day", "a bad night is"], ["is good and", "bad"]
    samples = [
        Sample(policy_tok(p)["input_ids"], policy_tok(r, add_special_tokens=False)["input_ids"],
               [0.0] * len(policy_tok(r, add_special_tokens=False)["input_ids"]), r)
        for p, r in zip(prompts, responses)
    ]  # fmt: skip
    rollout = assemble_rollout(samples, prompts, policy_tok.pad_token_id)
    cfg = RewardConfig(model_path=str(qwen2_models["reward"]), micro_batch_size=1)
    worker = RewardWorker(cfg, 1, policy_path=str(tiny_models["policy"]))
    assert worker.retokenize is not None

    received = []
    embed = worker.model.get_input_embeddings()
    embed.register_forward_hook(lambda module, args, out: received.append(args[0].clone()))
    out = worker.score(rollout).value
    assert out.valid.all() and torch.isfinite(out.scores).all()

    assert len(received) == 2  # micro_batch_size=1: one forward per sample
    for ids, p, r, policy_row in zip(received, prompts, responses, rollout.sequences):
        turns = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        text = rm_tok.apply_chat_template(turns, tokenize=False)
        assert "<|im_start|>assistant" in text  # the reward model's template, not the policy's
        expected, row = rm_tok(text, add_special_tokens=False)["input_ids"], ids[0].tolist()
        assert row[: len(expected)] == expected  # then right padding (masked out)
        assert set(row[len(expected) :]) <= {worker.retokenize.pad_id}
        assert row != policy_row[policy_row != policy_tok.pad_token_id].tolist()


def test_retokenized_without_a_template_is_the_concatenated_text(qwen2_models):
    tok = AutoTokenizer.from_pretrained(qwen2_models["reward"])
    tok.chat_template = None
    rm = RetokenizedRM(tok)
    assert rm.encode("the good", " day") == tok("the good day")["input_ids"]
    rollout = assemble_rollout(_samples([[1], [2, 3]]), ["a", "the good day"], 0)
    ids, mask = rm.batch(rollout)
    assert ids.shape == mask.shape and mask[0].sum() < mask[1].sum()  # right-padded rows
    assert (mask[:, 0] == 1).all()
