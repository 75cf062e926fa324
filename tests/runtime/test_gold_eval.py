"""Greedy report samples: batching changes nothing, and a tokenizer without a pad token works."""

from rayrlhf.data.demo_task import demo_prompts
from rayrlhf.models.tiny import make_tiny
from rayrlhf.runtime.gold_eval import greedy_gold_score, greedy_samples


def test_samples_do_not_depend_on_the_batch_size(tiny_models):
    prompts = demo_prompts(7, seed=3)
    whole = greedy_samples(tiny_models["policy"], prompts, max_new_tokens=6, batch=7)
    split = greedy_samples(tiny_models["policy"], prompts, max_new_tokens=6, batch=3)
    assert len(whole) == 7 and split == whole


def test_a_family_without_a_pad_token_is_scored(tmp_path):
    paths = make_tiny(tmp_path, family="llama3")
    prompts = demo_prompts(5, seed=4)
    score, samples = greedy_gold_score(paths["policy"], prompts, max_new_tokens=4)
    assert len(samples) == 5 and 0.0 <= score <= 1.0
