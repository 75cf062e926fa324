"""`rayrlhf pipeline`: SFT -> reward model -> PPO into one run directory, then a short report.

    run_dir/sft/    `rayrlhf sft` on the demonstrations; model/ is the SFT policy
    run_dir/rm/     `rayrlhf rm`, starting from the SFT policy's backbone unless rm.model_path
                    is set; model/ is the reward model. `rm: null` skips it: PPO's reward is
                    then its recipe's own (e.g. a verifiable task's checker as reward.rule)
    run_dir/ppo/    `rayrlhf train`: policy and reference = the SFT policy, critic = the SFT
                    backbone with a fresh value head (run_dir/ppo_init/critic, only when the
                    estimator uses a critic), reward = the RM
    run_dir/report.json  RM held-out accuracy, and per PPO evaluation (eval.at_start's record is
                    "before PPO") the proxy reward (the training reward), the gold score
                    (eval.gold, never trained on; else the reward's accuracy extra), response
                    length and KL; a warning when gold fell while the proxy rose (reward
                    hacking), and the plots PPO wrote (overoptimisation.png among them)

All three stages share one Ray instance, sized for PPO (the largest), so start-up is paid once.
Each stage's own `run_dir` and `make_tiny_models` are set by the pipeline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from pydantic import Field, model_validator
from transformers import AutoModelForTokenClassification, AutoTokenizer

from rayrlhf.cluster.capacity import cpus_needed
from rayrlhf.cluster.placement import start_ray
from rayrlhf.config import RunConfig, TrainConfig, load_config, load_recipe
from rayrlhf.models.saving import atomic_dir
from rayrlhf.recipes.rm import RMConfig, train_rm
from rayrlhf.recipes.sft import SFTConfig, train_sft
from rayrlhf.runtime.evaluation import SAMPLES_FILE
from rayrlhf.runtime.plots import GOLD_DROP_TOL, eval_series, gold_key, overoptimisation_warning
from rayrlhf.runtime.run_dir import (
    build_tiny_models,
    check_run_dir,
    read_metrics,
    write_run_config,
)

DEFAULT_PIPELINE_CONFIG = "tiny-cpu-pipeline.yaml"
REPORT_SAMPLES = 4
"""Eval prompts whose first and last responses the report shows."""


class PipelineConfig(RunConfig):
    """`rayrlhf pipeline`: run_dir gets the stages' sft/, rm/ and ppo/ sub-directories and
    report.json; seed seeds the PPO stage. The report reads PPO's evaluations: turn them on in
    the PPO recipe (eval.every_steps, eval.at_start, eval.gold)."""

    sft: SFTConfig
    """The SFT stage (its run_dir and make_tiny_models are set by the pipeline)."""
    rm: RMConfig | None
    """The reward-model stage; model_path defaults to the SFT policy (run_dir/sft/model).
    null: no reward model is trained, and PPO uses the reward section of its recipe
    (ppo_config / ppo_overrides), e.g. `reward.rule` (a verifiable task's checker)."""
    ppo_config: str | None = None
    """PPO recipe (as for `rayrlhf train`); None is the embedded configs/tiny-cpu.yaml."""
    ppo_overrides: list[str] = []
    """`--set`-style overrides of the PPO recipe, e.g. ["steps=20"]. The pipeline sets run_dir
    and the policy, reference, critic and reward model paths itself."""
    warn_gold_drop: float = Field(GOLD_DROP_TOL, ge=0)
    """The report warns of reward over-optimisation when the gold score's last evaluation is
    more than this (gold's units) below its best one while the proxy reward is above its value
    there (`rayrlhf.runtime.plots.overoptimisation_warning`)."""

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
        if data.get("rm", {}) is None:
            return {**data, "sft": sft}  # no RM stage
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
    ]
    if cfg.rm is not None:
        pinned.append(f"reward.model_path={run / 'rm' / 'model'}")
    return load_config(cfg.ppo_config, [*cfg.ppo_overrides, *pinned])


def init_critic(policy: Path, out: Path, seed: int) -> Path:
    """The policy's backbone with a fresh one-label value head (a token classifier), saved."""
    torch.manual_seed(seed)
    model = AutoModelForTokenClassification.from_pretrained(
        policy, num_labels=1, dtype=torch.float32
    )
    with atomic_dir(out) as tmp:  # complete or absent, never config.json alone
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(policy).save_pretrained(tmp)
    return out


def last_value(records: list[dict], key: str, optional: bool = False) -> float | None:
    """The last record's value of `key` (a metrics.jsonl column); None if absent and
    `optional` (e.g. eval/loss of an SFT stage without an eval set)."""
    values = [r[key] for r in records if key in r]
    if not values:
        if optional:
            return None
        raise KeyError(f"no {key!r} in the stage's metrics.jsonl")
    return values[-1]


def report(cfg: PipelineConfig, ppo_dir: Path) -> dict:
    """The end-of-run figures; written to run_dir/report.json and returned. `eval` holds the
    per-evaluation series of `rayrlhf.runtime.plots.eval_series` (NaN as null)."""
    run = Path(cfg.run_dir)
    ppo = read_metrics(ppo_dir)
    series = eval_series(ppo)
    out = {
        "rm_eval_accuracy": None if cfg.rm is None else rm_accuracy(run / "rm"),
        "sft_eval_loss": last_value(read_metrics(run / "sft"), "eval/loss", optional=True),
        "final_kl": last_value(ppo, "rollout/kl"),
        "final_reward_mean": last_value(ppo, "rollout/reward_mean"),
        "eval_prompts": max(
            (r["eval/num_prompts"] for r in ppo if "eval/num_prompts" in r), default=0
        ),
        "gold_key": gold_key(ppo),
        "eval": {k: [_or_none(x) for x in v] for k, v in series.items()},
        "overoptimisation_warning": overoptimisation_warning(series, cfg.warn_gold_drop),
        "plots": sorted(str(path) for path in ppo_dir.glob("*.png")),
        "samples": first_and_last_samples(ppo_dir / SAMPLES_FILE, REPORT_SAMPLES),
    }
    (run / "report.json").write_text(json.dumps(out, indent=2))
    return out


def rm_accuracy(rm_dir: Path) -> float:
    """The reward model's last held-out pairwise accuracy."""
    return last_value(read_metrics(rm_dir), "eval/accuracy")


def _or_none(x: float) -> float | None:
    """JSON has no NaN."""
    return x if math.isfinite(x) else None


def first_and_last_samples(path: Path, n: int) -> list[dict]:
    """The first `n` eval prompts with their responses at the first and the last evaluation
    (eval_samples.jsonl); [] without evaluations."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return []
    first, last = rows[0]["step"], rows[-1]["step"]
    at = {s: [r for r in rows if r["step"] == s][:n] for s in (first, last)}
    return [
        {"prompt": a["prompt"], "first": a["response"], "last": b["response"],
         "first_step": first, "last_step": last}
        for a, b in zip(at[first], at[last])
    ]  # fmt: skip


def _when(step: int) -> str:
    return "before PPO" if step == 0 else f"after step {step}"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_report(r: dict) -> None:
    """The report line, the over-optimisation warning if any, the per-evaluation table and a
    few samples."""
    ev, rm = r["eval"], r["rm_eval_accuracy"]
    line = f"pipeline report | RM held-out accuracy {_fmt(rm)}"
    if ev["step"]:
        span = f"{_when(ev['step'][0])} -> {_when(ev['step'][-1])}"
        line += f" | held-out eval on {r['eval_prompts']} prompts, {span}: proxy reward "
        line += f"{_fmt(ev['proxy'][0])} -> {_fmt(ev['proxy'][-1])}"
        if "gold" in ev:
            line += f", gold ({r['gold_key']}) {_fmt(ev['gold'][0])} -> {_fmt(ev['gold'][-1])}"
        length = ev["response_length"]
        line += f", length {_fmt(length[0], 1)} -> {_fmt(length[-1], 1)}"
    else:
        line += " | no evaluation (set eval.every_steps or eval.at_start in the PPO recipe)"
    print(f"{line} | final KL to reference {r['final_kl']:.3f} nats", flush=True)
    if r["overoptimisation_warning"]:
        print(r["overoptimisation_warning"], flush=True)
    for i, step in enumerate(ev["step"]):
        gold = f" | gold {_fmt(ev['gold'][i])}" if "gold" in ev else ""
        print(
            f"  eval {_when(step):>15} | KL {_fmt(ev['kl'][i])} | proxy {_fmt(ev['proxy'][i])}"
            f"{gold} | len {_fmt(ev['response_length'][i])}",
            flush=True,
        )
    for s in r["samples"]:
        print(
            f"  {s['prompt']!r}: {_when(s['first_step'])} {s['first']!r} | "
            f"{_when(s['last_step'])} {s['last']!r}",
            flush=True,
        )


def run_pipeline(cfg: PipelineConfig) -> dict:
    """SFT, then RM, then PPO (see the module docstring); returns the report."""
    from rayrlhf.recipes.ppo import train

    ppo = ppo_config(cfg)  # validated before any stage runs: a typo costs nothing
    check_run_dir(cfg)  # a previous pipeline run here (its stages') is refused, or overwritten
    build_tiny_models(cfg.make_tiny_models, cfg.make_tiny_size)
    run = write_run_config(cfg, cfg.run_dir, outputs=("sft", "rm", "ppo", "ppo_init"))
    start_ray(ppo.ray_address, cpus_needed(ppo))
    stages = 3 if cfg.rm is not None else 2
    print(f"== stage 1/{stages}: SFT", flush=True)
    train_sft(cfg.sft)
    if cfg.rm is not None:
        print("== stage 2/3: reward model", flush=True)
        train_rm(cfg.rm)
    print(f"== stage {stages}/{stages}: PPO", flush=True)
    if ppo.active_critic is not None:  # grpo and the other critic-free estimators need none
        init_critic(run / "sft" / "model", run / "ppo_init" / "critic", cfg.seed)
    ppo_dir = train(ppo)
    result = report(cfg, ppo_dir)
    print_report(result)
    return result


def main(config: str | None, overrides: list[str]) -> None:
    """`rayrlhf pipeline`."""
    run_pipeline(load_pipeline_config(config, overrides))
