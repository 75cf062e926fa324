"""Bring-your-own data on the real stack (Ray, ZeRO-3, vLLM): chat-format prompts from a parquet
file train the policy, a `save_to_disk` directory is the held-out eval set, and the prompt ids
the engines receive are exactly the chat-templated prompts. One short GRPO run (2 steps, eval
after step 2) on one Ray instance checks all of it, plus eval/* at the configured interval in
metrics.jsonl, TensorBoard and the plots.

The engines' prompt ids are taken from the samples they return: an engine builds each sample
from the prompt ids it was sent and generates the response from them.
"""

from __future__ import annotations

import shutil

import pytest
import ray
from transformers import AutoTokenizer

from rayrlhf.config import load_config
from rayrlhf.data.prompts import PromptSet
from rayrlhf.recipes import ppo_roles
from rayrlhf.recipes.ppo import train
from rayrlhf.runtime.run_dir import read_metrics

pytestmark = pytest.mark.slow

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOPICS = ("the sea", "the cat", "music", "the rain", "a book", "the park", "dinner", "a trip")


def _chat(topic: str, system: bool) -> dict:
    messages = [{"role": "user", "content": f"Describe {topic}:"}]
    if system:
        messages.insert(0, {"role": "system", "content": "Answer with kind words."})
    return {"messages": messages, "topic": topic}


@pytest.fixture(scope="module")
def chat_policy(tiny_models, tmp_path_factory):
    """The tiny policy with a chat template (its own, or a small one set on a saved copy)."""
    out = tmp_path_factory.mktemp("chat_policy") / "policy"
    shutil.copytree(tiny_models["policy"], out)
    tok = AutoTokenizer.from_pretrained(out)
    if not tok.chat_template:
        tok.chat_template = TEMPLATE
        tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()


def test_chat_parquet_and_save_to_disk_reach_the_engines_templated(
    tiny_models, chat_policy, ray_instance, tmp_path, monkeypatch
):
    import datasets

    train_rows = [_chat(t, system=i % 2 == 0) for i, t in enumerate(TOPICS)]
    eval_rows = [_chat(t, system=True) for t in TOPICS[:4]]
    datasets.Dataset.from_list(train_rows).to_parquet(str(tmp_path / "train.parquet"))
    datasets.Dataset.from_list(eval_rows).save_to_disk(str(tmp_path / "held_out"))
    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", "make_tiny_models=null", "steps=2", "save_final=false",
        f"policy.model_path={chat_policy}", "policy.num_ranks=1", "policy.micro_batch_size=4",
        f"reward.model_path={tiny_models['reward']}", "algorithm.advantage=grpo",
        "algorithm.n_samples_per_prompt=2", "algorithm.rollout_batch_size=8",
        "algorithm.num_mini_batches=1", "algorithm.ppo_epochs=1", "metrics.port=0",
        f"data.prompts={tmp_path / 'train.parquet'}", "data.max_prompt_tokens=128",
        "eval.every_steps=2", f"eval.prompts={tmp_path / 'held_out'}", "eval.num_prompts=4",
    ])  # fmt: skip
    calls = []  # (greedy, the engines' samples) of every generate
    generate = ppo_roles.Roles.generate

    def recording(self, prompt_ids, seed, greedy=False, timer=None):
        samples = generate(self, prompt_ids, seed, greedy, timer)
        calls.append((greedy, samples))
        return samples

    monkeypatch.setattr(ppo_roles.Roles, "generate", recording)
    run_dir = train(cfg)

    tok = AutoTokenizer.from_pretrained(chat_policy)

    def templated(row: dict) -> list[int]:
        return list(
            tok.apply_chat_template(
                row["messages"], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )

    # Training: each step's prompts, in the driver's order, each exactly a row's template.
    assert [greedy for greedy, _ in calls] == [False, False, True]
    drawn = PromptSet.load(cfg.data, tok, cfg.seed)
    allowed = [templated(r) for r in train_rows]
    for step in (0, 1):
        sent = [s.prompt_ids for s in calls[step][1]]
        assert sent == drawn.draw(step, 4, repeat=2).ids
        assert all(ids in allowed for ids in sent)
        assert all(s.response_ids for s in calls[step][1])  # generated from them
    raw = tok("\n".join(m["content"] for m in train_rows[0]["messages"]))["input_ids"]
    # Not the untemplated rendering (turns joined by "\n"): the default tiny template joins
    # them by EOS, the one above by role markers.
    assert allowed[0] != raw

    # Evaluation: the save_to_disk rows, in file order, greedy.
    assert [s.prompt_ids for s in calls[2][1]] == [templated(r) for r in eval_rows]

    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1]
    assert not any(k.startswith("eval/") for k in records[0])  # eval.every_steps=2
    assert records[1]["eval/num_prompts"] == 4
    assert records[1]["eval/response_length"] > 0
    assert "eval/reward_mean" in records[1]
    assert (run_dir / "eval_reward.png").read_bytes()[:4] == b"\x89PNG"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/reward_mean")] == [
        (1, pytest.approx(records[1]["eval/reward_mean"]))
    ]
    assert [e.step for e in events.Scalars("rollout/reward_mean")] == [0, 1]
