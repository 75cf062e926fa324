"""The learning-rate schedule of the ZeRO-3 groups: warm-up, then constant, linear or cosine, as
DeepSpeed steps it (a LambdaLR on its optimizer, stepped once per optimizer step)."""

from __future__ import annotations

import math

import pytest
import torch

from rayrlhf.config import ConfigError, PolicyConfig, load_config
from rayrlhf.workers.deepspeed_role import lr_multiplier, lr_scheduler


def _group(**kw) -> PolicyConfig:
    return PolicyConfig(model_path="m", lr=1.0, **kw)


def test_default_is_a_constant_lr_from_the_first_step():
    g = _group()
    assert [lr_multiplier(s, g) for s in range(4)] == [1.0] * 4


def test_warmup_then_constant():
    g = _group(lr_warmup_steps=4)
    assert [lr_multiplier(s, g) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_warmup_then_linear_to_the_floor_and_held():
    g = _group(lr_schedule="linear", lr_warmup_steps=2, lr_total_steps=6, lr_min_ratio=0.2)
    got = [lr_multiplier(s, g) for s in range(9)]
    want = [0.5, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2, 0.2]
    assert got == pytest.approx(want)


def test_cosine_without_warmup():
    g = _group(lr_schedule="cosine", lr_total_steps=4)
    got = [lr_multiplier(s, g) for s in range(6)]
    want = [0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)] + [0.0, 0.0]
    assert got == pytest.approx(want)
    assert got[2] == pytest.approx(0.5)


def test_the_scheduler_drives_an_optimizer_step_by_step():
    g = PolicyConfig(model_path="m", lr=0.1, lr_schedule="linear", lr_total_steps=4)
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([w], lr=g.lr)
    sched = lr_scheduler(g)(opt)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()  # what DeepSpeed does after each optimizer step
    assert seen == pytest.approx([0.1, 0.075, 0.05, 0.025, 0.0])


def test_decaying_schedules_need_their_length():
    with pytest.raises(ConfigError, match="policy: lr_schedule=cosine decays over lr_total_steps"):
        load_config(overrides=["policy.lr_schedule=cosine"])
    with pytest.raises(ConfigError, match="lr_warmup_steps=5 is more than lr_total_steps=4"):
        load_config(overrides=["critic.lr_warmup_steps=5", "critic.lr_total_steps=4"])
    cfg = load_config(overrides=["policy.lr_schedule=linear", "policy.lr_total_steps=80"])
    assert cfg.policy.lr_total_steps == 80
