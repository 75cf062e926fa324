"""DPO, KTO, ORPO, SimPO and Best-of-N on the real stack (Ray, DeepSpeed ZeRO-3 on gloo, vLLM
CPU), tiny models.

DPO: 500 synthetic "kind words" pairs, 2 epochs; the held-out implicit-reward accuracy must reach
0.9 (measured: 1.0 after the first epoch). The saved policy is then checked from its HF files.
KTO, ORPO, SimPO: each loss's recipe for one short epoch (256 pairs; KTO: their 512 sides as
rows) must reach held-out accuracy >= 0.9: the implicit-reward accuracy on 100 pairs, or for KTO
the share of 200 held-out rows on their label's side of the reference point. ORPO and SimPO must
start no reference actor; KTO starts exactly one. Measured 2026-12-01 on the 2-core CI machine:
1.0 for each, 27 to 58 s a run (98 to 158 s for the three).
Best-of-N: 8 samples per prompt scored by the tiny reward model beat one sample per prompt on
the same prompts (measured: mean score 0.095 vs 0.040).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayrlhf.cli import main
from rayrlhf.data.preferences import load_preferences
from rayrlhf.recipes.dpo import load_dpo_config
from rayrlhf.workers.dpo import PairLogps, pair_logps_batched, preference_eval, set_scores

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()


def _hf_logps(path: Path, pairs) -> PairLogps:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return PairLogps(*pair_logps_batched(model, pairs.batch(list(range(len(pairs)))), size=50))


def _run_recipe(recipe: str, run: Path, policy: Path, *overrides: str) -> list[dict]:
    """`rayrlhf dpo` with configs/<recipe>-tiny-cpu.yaml on the tiny policy; its metrics."""
    argv = ["dpo", "--config", str(ROOT / f"configs/{recipe}-tiny-cpu.yaml")]
    for override in (f"run_dir={run}", f"policy.model_path={policy}", "make_tiny_models=null"):
        argv += ["--set", override]
    for override in overrides:
        argv += ["--set", override]
    assert main(argv) == 0
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_dpo_learns_held_out_preferences(local_ray, tiny_models, tmp_path):
    run = tmp_path / "dpo"
    records = _run_recipe(
        "dpo", run, tiny_models["policy"], "synthetic_pairs=500", "epochs=2", "policy.lr=1e-3"
    )

    steps = [r for r in records if "dpo/loss" in r]
    evals = [r for r in records if "eval/reward_accuracy" in r]
    assert len(steps) == 2 * (500 // 32) and len(evals) == 2
    assert steps[0]["dpo/loss"] == pytest.approx(0.6931, abs=1e-3)  # pi == pi_ref: log 2
    assert steps[-1]["dpo/loss"] < 0.3
    for key in ("dpo/reward_accuracy", "dpo/chosen_reward", "dpo/rejected_reward", "dpo/margin"):
        assert key in steps[-1]
    assert evals[-1]["eval/pairs"] == 100
    assert evals[-1]["eval/reward_accuracy"] >= 0.9, evals  # issue acceptance 3

    # The saved HF policy carries what was trained: recompute the held-out accuracy from files.
    tok = AutoTokenizer.from_pretrained(run / "policy")
    held_out = load_preferences(run / "data" / "eval.jsonl", tok, max_len=64)
    ref = _hf_logps(tiny_models["policy"], held_out)
    scores = set_scores(held_out, _hf_logps(run / "policy", held_out), ref, None)
    params = load_dpo_config(run / "config.yaml").loss_params  # the run's own settings
    stats = preference_eval("dpo", params, scores)
    assert stats.reward_accuracy == pytest.approx(evals[-1]["eval/reward_accuracy"], abs=0.02)
    assert stats.margin == pytest.approx(evals[-1]["eval/margin"], rel=1e-3)


def _reference_actors() -> int:
    """Reference actors this Ray instance has started so far (dead ones included)."""
    actors = ray._private.state.actors().values()
    return sum(a["ActorClassName"] == "DPOReferenceWorker" for a in actors)


@pytest.mark.parametrize("loss, references", [("kto", 1), ("orpo", 0), ("simpo", 0)])
def test_each_loss_learns_held_out_preferences(local_ray, tiny_models, tmp_path, loss, references):
    before, policy = _reference_actors(), tiny_models["policy"]
    settings = ("synthetic_pairs=256", "epochs=1", "save_final=false")
    records = _run_recipe(loss, tmp_path / loss, policy, *settings)
    assert _reference_actors() - before == references  # issue acceptance 2
    steps = [r for r in records if "dpo/loss" in r]
    evals = [r for r in records if "eval/reward_accuracy" in r]
    rows = 512 if loss == "kto" else 256
    assert len(steps) == rows // 32 and len(evals) == 1
    assert steps[-1]["dpo/loss"] < steps[0]["dpo/loss"]
    assert evals[-1]["eval/pairs"] == (200 if loss == "kto" else 100)
    assert evals[-1]["eval/reward_accuracy"] >= 0.9, evals  # issue acceptance 3
    extra = {"kto": "dpo/kl", "orpo": "dpo/nll", "simpo": None}[loss]
    assert extra is None or extra in steps[-1]


def test_best_of_8_beats_one_sample(local_ray, tiny_models, capsys):
    argv = ["best-of-n", "--n", "8", "--prompts", "64"]
    for override in (
        f"policy.model_path={tiny_models['policy']}",
        f"critic.model_path={tiny_models['critic']}",
        f"reward.model_path={tiny_models['reward']}",
        "make_tiny_models=null",
    ):
        argv += ["--set", override]
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('{"n"')]
    report = json.loads(lines[-1])
    assert report["n"] == 8 and report["prompts"] == 64
    assert report["mean_best_score"] > report["mean_score_n1"], report  # issue acceptance 5
    # Picking the best of 8 can only beat their average.
    assert report["mean_best_score"] > report["mean_sample_score"]
    assert report["gold_best"] > report["gold_n1"]  # the gold rule agrees
