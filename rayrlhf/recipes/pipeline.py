"""`rayrlhf pipeline`: SFT -> reward model -> PPO into one run directory, then a short report.

    run_dir/sft/    `rayrlhf sft` on the demonstrations; model/ is the SFT policy
    run_dir/rm/     `rayrlhf rm`, starting from the SFT policy's backbone unless rm.model_path
                    is set; model/ is the reward model
    run_dir/ppo/    `rayrlhf train`: policy and reference = the SFT policy, critic = the SFT
                    backbone with a fresh value head (run_dir/ppo_init/critic), reward = the RM
    run_dir/report.json  RM held-out accuracy, greedy gold score of the SFT vs PPO policy on
                    prompts drawn with another seed, final KL to the reference

All three stages share one Ray instance, sized for PPO (the largest), so start-up is paid once.
Each stage's own `run_dir` and `make_tiny_models` are set by the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field, model_validator
from transformers import AutoModelForTokenClassification, AutoTokenizer

from rayrlhf.cluster.capacity import cpus_needed
from rayrlhf.cluster.placement import start_ray
from rayrlhf.config import RunConfig, TrainConfig, load_config, load_recipe
from rayrlhf.data.demo_task import demo_prompts
from rayrlhf.recipes.rm import RMConfig, train_rm
from rayrlhf.recipes.sft import SFTConfig, train_sft
from rayrlhf.runtime.gold_eval import greedy_gold_score
from rayrlhf.runtime.run_dir import build_tiny_models, read_metrics

DEFAULT_PIPELINE_CONFIG = "tiny-cpu-pipeline.yaml"
EVAL_SEED_OFFSET = 99_991
"""Report prompts use seed + this, so they are drawn apart from PPO's training prompts."""


class PipelineConfig(RunConfig):
    """`rayrlhf pipeline`: run_dir gets the stages' sft/, rm/ and ppo/ sub-directories and
    report.json; seed seeds the report's prompt draw and the PPO stage."""

    sft: SFTConfig
    """The SFT stage (its run_dir and make_tiny_models are set by the pipeline)."""
    rm: RMConfig
    """The reward-model stage; model_path defaults to the SFT policy (run_dir/sft/model)."""
    ppo_config: str | None = None
    """PPO recipe (as for `rayrlhf train`); None is the embedded configs/tiny-cpu.yaml."""
    ppo_overrides: list[str] = []
    """`--set`-style overrides of the PPO recipe, e.g. ["steps=20"]. The pipeline sets run_dir
    and the policy, reference, critic and reward model paths itself."""
    eval_prompts: int = Field(64, ge=1)
    """Prompts for the report's greedy gold-score comparison of the SFT and PPO policies."""
    max_new_tokens: int = Field(16, ge=1)
    """Greedy response length in the report."""

    @model_validator(mode="before")
    @classmethod
    def _stage_dirs(cls, data: object) -> object:
        """Point each stage at its sub-directory; the RM starts from the SFT policy by default."""
        if not isinstance(data, dict):
            return data
        if "run_dir" not in data:
            return data  # validation then names the missing field
        run = Path(data["run_dir"])
        sft = {**(data.get("sft") or {}), "run_dir": str(run / "sft"), "make_tiny_models": None}
        rm = {"model_path": str(run / "sft" / "model"), **(data.get("rm") or {})}
        rm.update(run_dir=str(run / "rm"), make_tiny_models=None)
        return {**data, "sft": sft, "rm": rm}


def load_pipeline_config(path: str | Path | None = None, overrides: list[str] = ()):
    """Load a YAML recipe (default: the embedded tiny pipeline), apply overrides, validate."""
    return load_recipe(PipelineConfig, DEFAULT_PIPELINE_CONFIG, path, list(overrides))


def ppo_config(cfg: PipelineConfig) -> TrainConfig:
    """The PPO TrainConfig: the recipe plus overrides pointing every model at the stages."""
    run, sft = Path(cfg.run_dir), Path(cfg.run_dir) / "sft" / "model"
    pinned = [
        f"run_dir={run / 'ppo'}",
        "make_tiny_models=null",
        f"seed={cfg.seed}",
        f"policy.model_path={sft}",
        f"reference.model_path={sft}",
        f"critic.model_path={run / 'ppo_init' / 'critic'}",
        f"reward.model_path={run / 'rm' / 'model'}",
    ]
    return load_config(cfg.ppo_config, [*cfg.ppo_overrides, *pinned])


def init_critic(policy: Path, out: Path, seed: int) -> Path:
    """The policy's backbone with a fresh one-label value head (a token classifier), saved."""
    torch.manual_seed(seed)
    model = AutoModelForTokenClassification.from_pretrained(
        policy, num_labels=1, dtype=torch.float32
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(policy).save_pretrained(out)
    return out


def last_value(records: list[dict], key: str) -> float:
    """The last record's value of `key` (a metrics.jsonl column)."""
    values = [r[key] for r in records if key in r]
    if not values:
        raise KeyError(f"no {key!r} in the stage's metrics.jsonl")
    return values[-1]


def report(cfg: PipelineConfig, ppo_dir: Path) -> dict:
    """The end-of-run figures; written to run_dir/report.json and returned."""
    run = Path(cfg.run_dir)
    prompts = demo_prompts(cfg.eval_prompts, cfg.seed + EVAL_SEED_OFFSET)
    sft_gold, sft_samples = greedy_gold_score(run / "sft/model", prompts, cfg.max_new_tokens)
    ppo_gold, ppo_samples = greedy_gold_score(ppo_dir / "policy", prompts, cfg.max_new_tokens)
    ppo = read_metrics(ppo_dir)
    out = {
        "rm_eval_accuracy": last_value(read_metrics(run / "rm"), "eval/accuracy"),
        "sft_eval_loss": last_value(read_metrics(run / "sft"), "eval/loss"),
        "gold_score_sft_greedy": sft_gold,
        "gold_score_ppo_greedy": ppo_gold,
        "final_kl": last_value(ppo, "rollout/kl"),
        "final_reward_mean": last_value(ppo, "rollout/reward_mean"),
        "eval_prompts": len(prompts),
        "samples": [
            {"prompt": p, "sft": s, "ppo": q}
            for p, s, q in list(zip(prompts, sft_samples, ppo_samples))[:4]
        ],
    }
    (run / "report.json").write_text(json.dumps(out, indent=2))
    return out


def print_report(r: dict) -> None:
    print(
        f"pipeline report | RM held-out accuracy {r['rm_eval_accuracy']:.3f} | gold score of "
        f"greedy outputs on {r['eval_prompts']} prompts: SFT {r['gold_score_sft_greedy']:.3f} "
        f"-> PPO {r['gold_score_ppo_greedy']:.3f} | final KL to reference "
        f"{r['final_kl']:.3f} nats",
        flush=True,
    )
    for s in r["samples"]:
        print(f"  {s['prompt']!r}: SFT {s['sft']!r} | PPO {s['ppo']!r}", flush=True)


def run_pipeline(cfg: PipelineConfig) -> dict:
    """SFT, then RM, then PPO (see the module docstring); returns the report."""
    from rayrlhf.recipes.ppo import train

    ppo = ppo_config(cfg)  # validated before any stage runs: a typo costs nothing
    build_tiny_models(cfg.make_tiny_models)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    start_ray(ppo.ray_address, cpus_needed(ppo))
    print("== stage 1/3: SFT", flush=True)
    train_sft(cfg.sft)
    print("== stage 2/3: reward model", flush=True)
    train_rm(cfg.rm)
    print("== stage 3/3: PPO", flush=True)
    init_critic(run / "sft" / "model", run / "ppo_init" / "critic", cfg.seed)
    ppo_dir = train(ppo)
    result = report(cfg, ppo_dir)
    print_report(result)
    return result


def main(config: str | None, overrides: list[str]) -> None:
    """`rayrlhf pipeline`."""
    run_pipeline(load_pipeline_config(config, overrides))
