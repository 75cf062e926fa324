"""The pipeline without a reward-model stage, and its report from synthetic stage directories
(metrics.jsonl and eval_samples.jsonl as PPO writes them; no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

from rayrlhf.recipes.pipeline import load_pipeline_config, ppo_config, print_report, report

ROOT = Path(__file__).resolve().parents[2]
RULE = "rayrlhf.data.demo_task:gold_score"


def test_rm_null_trains_no_reward_model_and_ppo_keeps_its_recipes_reward(tmp_path):
    cfg = load_pipeline_config(
        ROOT / "configs/tiny-cpu-pipeline.yaml",
        [f"run_dir={tmp_path}", "rm=null",
         f"ppo_overrides=[reward.model_path=null,reward.rule={RULE},algorithm.advantage=grpo,"
         "algorithm.n_samples_per_prompt=4]"],
    )  # fmt: skip
    assert cfg.rm is None
    ppo = ppo_config(cfg)
    assert ppo.reward.model_path is None and ppo.reward.rule == RULE  # not pinned to rm/model
    assert ppo.active_critic is None  # grpo: the pipeline builds no critic either
    assert ppo.policy.model_path == str(tmp_path / "sft/model")


def test_the_demo_pipeline_evaluates_before_ppo_and_scores_gold_on_the_same_responses(tmp_path):
    cfg = load_pipeline_config(ROOT / "configs/tiny-cpu-pipeline.yaml", [f"run_dir={tmp_path}"])
    ev = ppo_config(cfg).eval
    assert ev.at_start and ev.every_steps > 0 and ev.gold == RULE
    assert ppo_config(cfg).reward.model_path == str(tmp_path / "rm/model")  # the proxy


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _stages(run: Path, gold: str = "eval/gold", rm: bool = True) -> None:
    """sft/, rm/ and ppo/ as the stages leave them: 4 PPO steps, evaluations at start, after
    2 and after 4; gold peaks after step 2 and falls while the proxy rises."""
    _jsonl(run / "sft/metrics.jsonl", [{"step": 0, "eval/loss": 1.5}])
    if rm:
        _jsonl(run / "rm/metrics.jsonl", [{"step": 0, "eval/accuracy": 0.97}])
    evals = {-1: (0.1, 0.3, 16.0), 1: (0.5, 0.6, 12.0), 3: (0.9, 0.2, 3.0)}
    recs = []
    for step, (proxy, g, length) in evals.items():
        rec = {"step": step, "eval/reward_mean": proxy, gold: g, "eval/response_length": length}
        recs.append(rec | {"eval/num_prompts": 8})
    for s in range(4):
        recs.append({"step": s, "rollout/kl": 0.5 * s, "rollout/reward_mean": 0.2 * s})
    _jsonl(run / "ppo/metrics.jsonl", sorted(recs, key=lambda r: r["step"]))
    samples = [
        {"step": s + 1, "prompt": f"p{i}", "response": f"r{i}@{s + 1}", "reward": 0.0, "gold": 0.0}
        for s in evals
        for i in range(8)
    ]
    _jsonl(run / "ppo/eval_samples.jsonl", samples)


def test_report_carries_the_per_evaluation_series_and_warns_of_reward_hacking(tmp_path, capsys):
    _stages(tmp_path)
    cfg = load_pipeline_config(ROOT / "configs/tiny-cpu-pipeline.yaml", [f"run_dir={tmp_path}"])
    r = report(cfg, tmp_path / "ppo")
    assert json.loads((tmp_path / "report.json").read_text()) == r
    assert r["eval"] == {
        "step": [0, 2, 4],
        "proxy": [0.1, 0.5, 0.9],
        "gold": [0.3, 0.6, 0.2],
        "response_length": [16.0, 12.0, 3.0],
        "kl": [0.0, 1.0, 1.5],
    }
    assert r["gold_key"] == "eval/gold" and r["rm_eval_accuracy"] == 0.97
    assert r["eval_prompts"] == 8 and r["final_kl"] == 1.5
    assert "fell from 0.600 (after step 2) to 0.200 (after step 4)" in r["overoptimisation_warning"]
    assert r["samples"][0] == {
        "prompt": "p0", "first": "r0@0", "last": "r0@4", "first_step": 0, "last_step": 4,
    }  # fmt: skip
    assert len(r["samples"]) == 4
    print_report(r)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "pipeline report | RM held-out accuracy 0.970 | held-out eval on 8 prompts, before PPO "
        "-> after step 4: proxy reward 0.100 -> 0.900, gold (eval/gold) 0.300 -> 0.200, length "
        "16.0 -> 3.0 | final KL to reference 1.500 nats"
    )
    assert lines[1].startswith("WARNING reward over-optimisation")
    assert (
        lines[2].split()
        == "eval before PPO | KL 0.000 | proxy 0.100 | gold 0.300 | len 16.000".split()
    )
    assert len(lines) == 2 + 3 + 4  # the line, the warning, 3 evaluations, 4 samples


def test_without_rm_the_gold_is_the_rewards_accuracy(tmp_path, capsys):
    _stages(tmp_path, gold="eval/reward/accuracy", rm=False)
    cfg = load_pipeline_config(
        ROOT / "configs/tiny-cpu-pipeline.yaml",
        [f"run_dir={tmp_path}", "rm=null", "ppo_overrides=[reward.rule=m:f]"],
    )
    r = report(cfg, tmp_path / "ppo")
    assert r["rm_eval_accuracy"] is None and r["gold_key"] == "eval/reward/accuracy"
    assert r["eval"]["gold"] == [0.3, 0.6, 0.2]
    print_report(r)
    assert "RM held-out accuracy - |" in capsys.readouterr().out


def test_an_sft_stage_without_an_eval_set_reports_no_eval_loss(tmp_path):
    _stages(tmp_path, gold="eval/reward/accuracy", rm=False)
    _jsonl(tmp_path / "sft/metrics.jsonl", [{"step": 0, "sft/loss": 2.0}])  # train rows only
    cfg = load_pipeline_config(ROOT / "configs/tiny-cpu-math.yaml", [f"run_dir={tmp_path}"])
    r = report(cfg, tmp_path / "ppo")
    assert r["sft_eval_loss"] is None and r["eval"]["gold"] == [0.3, 0.6, 0.2]
