"""Side by side with TRL: GRPO on identical work, one JSON object on stdout.

    python benchmarks/vs_trl.py --size tiny --steps 6
    rayrlhf make-tiny models/100m --size 100m    # once, for:
    python benchmarks/vs_trl.py --size 100m --steps 4

TRL's `GRPOTrainer` (HF generate) runs in a virtual environment of its own,
`benchmarks/.venv-trl`, created on first use with trl==1.16.0 and the project's torch and
transformers versions, never in `.venv`. The project runs GRPO through its real loop (Ray,
ZeRO-3, vLLM; `throughput.py`'s runner). Identical work on both sides: the same policy and
reward model, the demo task's prompts, 32 responses a step as 4 prompts x 8 samples, at most 16
(tiny) or 32 (100m) response tokens, the KL in the loss (k3) with coefficient 0.01, lr 5e-4 and
one optimizer step per batch. The first step (warm-up) is left out of both sides' averages.
TRL's vLLM colocate mode is not run: it needs vLLM inside TRL's environment and a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

import ray
import torch
import transformers
from throughput import ROOT, bench_config, run_on_one_stack, summarize

from rayrlhf.data.demo_task import demo_prompts
from rayrlhf.runtime.run_dir import read_metrics

TRL = "1.16.0"
VENV = ROOT / "benchmarks" / ".venv-trl"
PROMPTS, SAMPLES, LR, KL = 4, 8, 5e-4, 0.01
RESPONSE_TOKENS = {"tiny": 16, "100m": 32}
GRPO = [
    "algorithm.advantage=grpo", f"algorithm.n_samples_per_prompt={SAMPLES}",
    f"algorithm.rollout_batch_size={PROMPTS * SAMPLES}", "algorithm.kl_mode=loss",
    "algorithm.kl_estimator=k3", f"algorithm.kl_coef={KL}", f"policy.lr={LR}",
    "algorithm.ppo_epochs=1", "algorithm.num_mini_batches=1",
]  # fmt: skip


def trl_python(venv: Path) -> Path:
    """TRL's interpreter; the environment is made and filled (pinned) when it lacks TRL."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    found = subprocess.run(
        [python, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True
    )
    if found.stdout.strip() != TRL:
        pins = [f"trl=={TRL}", f"torch=={torch.__version__}"]
        pins += [f"transformers=={transformers.__version__}"]
        print(f"[vs-trl] installing {' '.join(pins)} into {venv}", file=sys.stderr, flush=True)
        subprocess.run([python, "-m", "pip", "install", "-q", *pins], check=True, stdout=sys.stderr)
    return python


def rayrlhf_side(size: str, steps: int, tmp: str, extra: list[str]) -> dict:
    cfg = bench_config(size, 1, steps, f"{tmp}/rayrlhf", GRPO + extra)
    assert cfg.rollout.max_new_tokens == RESPONSE_TOKENS[size]
    ray.init(num_cpus=7, include_dashboard=False, log_to_driver=False)
    try:
        with redirect_stdout(sys.stderr):
            run_dir, _ = run_on_one_stack(cfg, compare=False)
    finally:
        ray.shutdown()
    s = summarize(read_metrics(run_dir), cfg)
    keep = ("step_seconds", "generated_tokens_per_sec", "phase_seconds", "measured_steps")
    keep += ("role_busy_seconds", "efficiency")
    return {k: s[k] for k in keep} | {"policy_ranks": cfg.policy.num_ranks}


def trl_side(size: str, steps: int, tmp: str) -> dict:
    models = ROOT / "models" / size
    settings = {
        "policy": str(models / "policy"), "reward": str(models / "reward"),
        "prompts": demo_prompts(PROMPTS * steps, seed=0), "steps": steps, "seed": 0,
        "batch": PROMPTS * SAMPLES, "samples_per_prompt": SAMPLES,
        "max_new_tokens": RESPONSE_TOKENS[size], "lr": LR, "kl_coef": KL,
    }  # fmt: skip
    path = Path(tmp) / "trl.json"
    path.write_text(json.dumps(settings))
    script = ROOT / "benchmarks" / "trl_side.py"
    out = subprocess.run(
        [trl_python(VENV), script, path], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        sys.exit(f"TRL's run failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    seconds, generated = r["step_seconds"][1:], r["generated"][1:]
    return {
        "step_seconds": statistics.fmean(seconds),
        "generated_tokens_per_sec": sum(generated) / sum(seconds),
        "measured_steps": len(seconds),
        "torch_threads": r["threads"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(RESPONSE_TOKENS), default="tiny")
    parser.add_argument("--steps", type=int, default=6, help="steps a side (first is warm-up)")
    parser.add_argument(
        "--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
        help="an override of the project's side (its layout, say); the work stays identical",
    )  # fmt: skip
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rayrlhf-vs-trl-") as tmp:
        ours = rayrlhf_side(args.size, args.steps, tmp, args.extra)  # builds tiny if needed
        print("[vs-trl] TRL GRPOTrainer", file=sys.stderr, flush=True)
        theirs = trl_side(args.size, args.steps, tmp)
    out = {
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/vs_trl.py " + " ".join(argv or sys.argv[1:]),
        "size": args.size,
        "settings": {
            "prompts_per_step": PROMPTS,
            "samples_per_prompt": SAMPLES,
            "max_response_tokens": RESPONSE_TOKENS[args.size],
            "lr": LR,
            "kl": f"k3 in the loss, coefficient {KL}",
            "optimizer_steps_per_batch": 1,
            "trl": f"trl=={TRL}, GRPOTrainer, HF generate",
            "steps": args.steps,
            "rayrlhf_overrides": args.extra,
        },  # fmt: skip
        "trl": theirs,
        "rayrlhf": ours,
        "ratio": ours["generated_tokens_per_sec"] / theirs["generated_tokens_per_sec"],
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
