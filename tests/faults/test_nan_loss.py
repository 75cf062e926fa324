"""Fault matrix, NaN loss: a non-finite loss or gradient skips the optimizer step on every rank
alike, counted, with weights and optimizer state bit-identical, and the next good step trains
as if the bad one never came.

The ranks are real: two DeepSpeed ZeRO-3 processes on gloo (`nan_step_ranks.py`), each running
a policy and a critic; the faults are injected on one rank only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayrlhf.types import TrainStats
from rayrlhf.workers.deepspeed_role import StepOutcome
from rayrlhf.workers.policy import mean_stats

RANKS = Path(__file__).with_name("nan_step_ranks.py")
WORLD = 2
BAD = ("nan", "inf", "inf_loss_finite_grad")


def test_outcomes_count_skips_and_average_only_applied_norms():
    nan = StepOutcome(float("nan"), True, 3)
    fields = StepOutcome.fields([None, nan, None, StepOutcome(2.0, False, 0), None])
    assert fields == {"grad_norm": 2.0, "skipped": 1.0, "skip_streak": 3.0}
    assert StepOutcome.fields([None, nan]) == {"grad_norm": 0.0, "skipped": 1.0, "skip_streak": 3}
    assert StepOutcome.fields([None]) == {"grad_norm": 0.0, "skipped": 0.0, "skip_streak": 0.0}


def test_mean_over_ranks_keeps_the_count_and_the_longest_streak():
    ranks = [TrainStats(loss=1.0, skipped=2.0, skip_streak=2.0)] * 2
    epochs = [*ranks, TrainStats(loss=3.0, skipped=0.0, skip_streak=0.0)]
    assert mean_stats(ranks).skipped == 2.0  # every rank skips alike
    assert (mean_stats(epochs).loss, mean_stats(epochs).skip_streak) == (5 / 3, 2.0)


def test_the_step_record_counts_skips_over_ranks_and_epochs():
    from rayrlhf.algorithms.experience import RolloutStats
    from rayrlhf.runtime.metrics import PhaseTimer, step_record
    from rayrlhf.types import SyncResult

    # Roles.train: the mean over 2 ranks x 2 epochs; epoch 1 skipped one step, epoch 2 none.
    pol = mean_stats([TrainStats(loss=0.0, skipped=1.0, skip_streak=1.0)] * 2
                     + [TrainStats(loss=0.0)] * 2)  # fmt: skip
    rollout = RolloutStats(0.0, 0.0, 0.0, 1.0, 1, 1, 0.0, 0.0)
    rec = step_record(0, rollout, pol, TrainStats(loss=0.0), SyncResult("", 0, 0, 0),
                      PhaseTimer(), ppo_epochs=2)  # fmt: skip
    assert (rec["policy/skipped_steps"], rec["critic/skipped_steps"]) == (1.0, 0.0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each rank's process wrote (see nan_step_ranks.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayrlhf.cluster.rendezvous import free_port

    out = tmp_path_factory.mktemp("nan_steps")
    cfg = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out / "model")
    args = [str(WORLD), str(free_port()), str(out / "model")]
    procs = [
        subprocess.Popen(
            [sys.executable, RANKS, str(r), *args, out / f"{r}.json"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for r in range(WORLD)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-3000:]
    return [json.loads((out / f"{r}.json").read_text()) for r in range(WORLD)]


def _calls(rank: dict, run: str) -> dict[str, dict]:
    return {c["call"]: c for c in rank[run]}


@pytest.mark.slow
@pytest.mark.parametrize("role", ["policy", "critic"])
def test_bad_step_is_skipped_on_every_rank_with_state_bit_identical(ranks, role):
    for rank in ranks:
        calls = _calls(rank, f"{role}_A")
        assert calls["good1"]["stats"]["skipped"] == 0.0
        for streak, name in enumerate((b for b in BAD if b in calls), 1):
            # The fault is on one rank only; both skip, and nothing changed.
            assert calls[name]["state"] == calls["good1"]["state"], (role, name)
            stats = calls[name]["stats"]
            assert (stats["skipped"], stats["skip_streak"], stats["grad_norm"]) == (1, streak, 0)
    # An inf loss with a finite gradient (k1 KL against a -inf reference logprob), which
    # DeepSpeed alone would apply, is a policy fault only.
    assert ("inf_loss_finite_grad" in _calls(ranks[0], f"{role}_A")) == (role == "policy")


@pytest.mark.slow
@pytest.mark.parametrize("role", ["policy", "critic"])
def test_the_next_good_step_trains_as_if_the_bad_ones_never_came(ranks, role):
    for rank in ranks:
        faulty, clean = _calls(rank, f"{role}_A"), _calls(rank, f"{role}_B")
        assert clean["good1"]["state"] == faulty["good1"]["state"]
        assert clean["good2"]["state"] != clean["good1"]["state"]  # it trains
        # One call: a NaN first optimizer step (skipped), then the second good batch.
        mixed = faulty["nan_then_good2"]
        assert mixed["state"] == clean["good2"]["state"]
        assert mixed["stats"]["skipped"] == 1.0
        assert mixed["stats"]["grad_norm"] == clean["good2"]["stats"]["grad_norm"] > 0
