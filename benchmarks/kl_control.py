"""Adaptive KL control on the demo task: does the controller hold KL near its target?

    python benchmarks/kl_control.py                     # adaptive, then the fixed-beta baseline
    python benchmarks/kl_control.py --no-baseline --steps 60

PPO on the tiny demo models (the embedded CPU recipe) with `algorithm.kl_controller=adaptive`,
then the same run with beta fixed at the controller's starting value. Prints one JSON object:
for each run, the measured KL (`rollout/kl`, nats per sequence) and beta of every step, and over
the second half of the run the KL's min, max, mean and the fraction of steps within
[target / 2, 2 x target].
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

import ray

from rayrlhf.config import load_config
from rayrlhf.recipes.ppo import train
from rayrlhf.runtime.run_dir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TARGET = 3.0
ADAPTIVE = [
    "algorithm.kl_controller=adaptive",
    f"algorithm.kl_target={TARGET}",
    "algorithm.kl_horizon=128",  # beta's integral moves at most 5% per step (batch 32)
    "algorithm.kl_gain=1.5",
    "algorithm.kl_coef=0.01",
    "algorithm.kl_coef_min=0.01",
]


def second_half(kl: list[float], target: float) -> dict:
    half = kl[len(kl) // 2 :]
    inside = [target / 2 <= k <= 2 * target for k in half]
    return {
        "min": min(half),
        "max": max(half),
        "mean": statistics.fmean(half),
        "fraction_in_band": sum(inside) / len(half),
    }


def run(name: str, overrides: list[str], steps: int, tmp: str) -> dict:
    cfg = load_config(
        ROOT / "configs" / "tiny-cpu.yaml",
        [
            f"steps={steps}",
            f"run_dir={tmp}/{name}",
            f"make_tiny_models={ROOT / 'models' / 'tiny'}",
            "save_final=false",
            "metrics.prometheus=false",
            "metrics.plots=false",
            *overrides,
        ],
    )
    print(f"[kl-control] {name}: {steps} steps", flush=True)
    records = read_metrics(train(cfg))
    kl = [r["rollout/kl"] for r in records]
    return {
        "overrides": overrides,
        "second_half": second_half(kl, TARGET),
        "kl": kl,
        "beta": [r["rollout/kl_coef"] for r in records],
        "reward": [r["rollout/reward_mean"] for r in records],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--no-baseline", action="store_true", help="skip the fixed-beta run")
    args = parser.parse_args(argv)
    out = {"target": TARGET, "band": [TARGET / 2, 2 * TARGET], "runs": {}}
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="rayrlhf-kl-") as tmp, redirect_stdout(sys.stderr):
        out["runs"]["adaptive"] = run("adaptive", ADAPTIVE, args.steps, tmp)
        if not args.no_baseline:
            out["runs"]["fixed"] = run("fixed", ["algorithm.kl_coef=0.01"], args.steps, tmp)
    ray.shutdown()
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
