"""benchmarks/throughput.py on the tiny models: the JSON it prints, and what its figures mean."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PHASES = {"generate", "score", "advantage", "train", "sync"}
RUN_FIELDS = {
    "num_engines", "policy_ranks", "devices", "step_seconds", "generated_tokens_per_sec",
    "total_tokens_per_sec", "tokens_per_sec_per_device", "phase_seconds", "phase_share",
    "orchestration_overhead", "sync_seconds", "sync_share", "sync_gb_per_sec", "sync_bytes",
}  # fmt: skip
SYNC_MODES = {
    "bucketed", "per_parameter", "bucketed_object_store", "per_parameter_streamed",
    "bucketed_gathered",
}  # fmt: skip


@pytest.fixture(scope="module")
def bench() -> dict:
    cmd = [
        sys.executable, "benchmarks/throughput.py", "--size", "tiny", "--steps", "2",
        "--engines", "1", "--sync-compare",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # stdout is the JSON alone: progress goes to stderr


def test_run_figures_are_complete_and_consistent(bench):
    (run,) = bench["runs"]
    assert RUN_FIELDS <= run.keys(), RUN_FIELDS - run.keys()
    assert run["num_engines"] == 1 and run["policy_ranks"] == 2
    assert set(run["phase_seconds"]) == set(run["phase_share"]) == PHASES
    assert all(v > 0 for v in run["phase_seconds"].values())
    # Phases and orchestration account for the step; per-device throughput is as defined.
    assert 0.5 < sum(run["phase_share"].values()) <= 1 + 1e-6
    per_device = run["total_tokens_per_sec"] / run["devices"]
    assert math.isclose(run["tokens_per_sec_per_device"], per_device, rel_tol=1e-9)
    assert run["total_tokens_per_sec"] > run["generated_tokens_per_sec"] > 0
    assert math.isclose(run["sync_share"], run["phase_share"]["sync"], rel_tol=1e-9)


def test_sync_comparison_loads_the_same_weights_every_way(bench):
    sync, (run,) = bench["sync"], bench["runs"]
    assert SYNC_MODES <= sync.keys()
    assert sync["same_weights_in_every_mode"] is True
    assert sync["bytes"] == run["sync_bytes"] > 0
    # Peers' mode is one round trip per tensor; the bucketed sync packs them.
    assert sync["per_parameter"]["buckets"] > sync["bucketed"]["buckets"] >= 1
    assert sync["speedup"] > 1, sync
    assert 0 < sync["fraction_of_memcpy"] < 1


def test_efficiency_figures_put_each_role_against_the_measured_peak(bench, tiny_models):
    """FLOP/s per role and for the step, each a fraction of the matmul peak of its threads:
    below 1, above 0, and the parameter count is the model's, less its input embedding."""
    from transformers import AutoModelForCausalLM

    eff = bench["runs"][0]["efficiency"]
    assert min(eff["matmul_peak_gflops_per_sec"].values()) > 0
    roles = eff["roles"]
    expected = {"generate", "reference", "reward", "old_logprobs", "train_policy", "critic"}
    assert expected | {"train_critic"} == roles.keys(), roles.keys()
    for name, role in roles.items():
        assert 0 < role["fraction_of_peak"] < 1, (name, role)
    assert 0 < eff["step"]["fraction_of_peak"] < 1
    policy = AutoModelForCausalLM.from_pretrained(tiny_models["policy"])
    whole = sum(p.numel() for p in policy.parameters())
    embed = policy.get_input_embeddings().weight.numel()
    assert not policy.config.tie_word_embeddings  # else the output layer counts the embedding
    assert roles["generate"]["params"] == roles["train_policy"]["params"] == whole - embed
