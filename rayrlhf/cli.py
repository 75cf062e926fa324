"""`rayrlhf` command line: one table of commands, each run by a recipe's `main`.

Exit codes: 0 success, 1 the run failed, 2 bad input (config, paths, data) found before Ray
starts. A command's module is imported only when it runs, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import PurePath
from typing import get_args

from rayrlhf.cluster.errors import RoleFailed
from rayrlhf.config import ConfigError
from rayrlhf.config.loading import load_recipe
from rayrlhf.data.jsonl import DataError

EXAMPLES = r"""examples:
  rayrlhf pipeline --config configs/tiny-cpu-pipeline.yaml    # SFT -> RM -> PPO (the demo)
  rayrlhf train                                   # PPO alone: the embedded tiny CPU recipe
  rayrlhf train --config configs/tiny-cpu.yaml --set algorithm.rollout_batch_size=16 --set steps=5
  rayrlhf check-config --config configs/tiny-cpu.yaml
  rayrlhf check-placement --config configs/llama3-8b-2x8xa100.yaml \
      --cluster deploy/cluster-shapes/llama3-8b-2x8xa100.yaml
  rayrlhf make-tiny models/tiny
  rayrlhf make-tiny models/tiny-llama3 --family llama3   # Llama-3's tokenizer: no pad token
  rayrlhf dpo --config configs/dpo-tiny-cpu.yaml --set epochs=1
  rayrlhf best-of-n --config configs/tiny-cpu.yaml --n 8 --prompts 64
  rayrlhf sft --config configs/sft-tiny-cpu.yaml
  rayrlhf rm --config configs/rm-tiny-cpu.yaml --set epochs=1
  rayrlhf scale runs/tiny-ppo --engines 2          # a running job's rollout pool, live
  rayrlhf serve-reward --rule rayrlhf.data.demo_task:positive_word_fraction --port 8300
      # then: --set reward.remote.url=http://127.0.0.1:8300/score (docs/rewards.md)
"""

PPO = "rayrlhf.config:TrainConfig"


@dataclass(frozen=True)
class Option:
    """One extra command-line option: argparse's flags and keyword arguments."""

    flags: tuple[str, ...]
    kwargs: dict


@dataclass(frozen=True)
class Command:
    """A `rayrlhf` command. `main` is called with the parsed options as keyword arguments."""

    help: str
    main: str
    """"module:function" that runs it; returns an exit code (None means 0)."""
    config: str | None = None
    """"module:Class" of its recipe: adds --config, --set and --help-config."""
    default: str | None = None
    """The embedded recipe used without --config, for the help text."""
    options: tuple[Option, ...] = ()


COMMANDS: dict[str, Command] = {
    "pipeline": Command(
        "SFT -> reward model -> PPO into one run directory",
        "rayrlhf.recipes.pipeline:main", "rayrlhf.recipes.pipeline:PipelineConfig",
        "configs/tiny-cpu-pipeline.yaml",
    ),
    "train": Command(
        "run PPO", "rayrlhf.recipes.ppo:main", PPO, "configs/tiny-cpu.yaml",
        (
            Option(
                ("--resume",),
                {"action": "store_true",
                 "help": "continue from the newest complete checkpoint in run_dir "
                 "(docs/checkpoints.md); exit 3 means stopped by a signal after a checkpoint"},
            ),
        ),
    ),
    "sft": Command(
        "supervised fine-tuning on demonstrations", "rayrlhf.recipes.sft:main",
        "rayrlhf.recipes.sft:SFTConfig", "configs/sft-tiny-cpu.yaml",
    ),
    "rm": Command(
        "train a reward model on preference pairs", "rayrlhf.recipes.rm:main",
        "rayrlhf.recipes.rm:RMConfig", "configs/rm-tiny-cpu.yaml",
    ),
    "dpo": Command(
        "preference optimisation: DPO, IPO, cDPO, KTO, ORPO, SimPO", "rayrlhf.recipes.dpo:main",
        "rayrlhf.recipes.dpo:DPOConfig", "configs/dpo-tiny-cpu.yaml",
    ),
    "best-of-n": Command(
        "sample n responses per prompt, keep the reward's best", "rayrlhf.recipes.best_of_n:main",
        PPO, "configs/tiny-cpu.yaml",
        (
            Option(("--n",), {"type": int, "default": 8, "help": "samples per prompt (default 8)"}),
            Option(
                ("--prompts",), {"type": int, "default": 64, "help": "prompts (default 64)"}
            ),
        ),
    ),
    "serve-reward": Command(
        "serve a reward function or reward model over HTTP (for reward.remote)",
        "rayrlhf.recipes.serve_reward:main",
        options=(  # unset options take ServeRewardConfig's defaults (the one place they live)
            Option(
                ("--rule",),
                {"default": argparse.SUPPRESS, "metavar": "MODULE:FUNCTION",
                 "help": "a reward function fn(prompts, responses, rows) -> float or "
                 "{score, extras} per sample, sync or async (docs/rewards.md)"},
            ),
            Option(
                ("--model",),
                {"default": argparse.SUPPRESS, "metavar": "PATH",
                 "help": "or: an HF one-label sequence-classification reward model directory; "
                 "text is re-encoded with its own tokenizer"},
            ),
            Option(
                ("--host",),
                {"default": argparse.SUPPRESS,
                 "help": "address to bind (default 127.0.0.1: this machine only; no auth)"},
            ),
            Option(
                ("--port",),
                {"type": int, "default": argparse.SUPPRESS,
                 "help": "TCP port (default 8300; 0 = a free one, printed at start)"},
            ),
            Option(
                ("--micro-batch-size",),
                {"type": int, "default": argparse.SUPPRESS,
                 "help": "sequences per reward-model forward pass (default 16)"},
            ),
        ),
    ),
    "scale": Command(
        "change the number of vLLM engines of a running PPO job at its next step boundary",
        "rayrlhf.runtime.scale:scale_main",
        options=(
            Option(("run_dir",), {"help": "the running job's run_dir"}),
            Option(
                ("--engines",),
                {"type": int, "required": True, "metavar": "N",
                 "help": "engines to run with; with ray job submit, submit this command as a "
                 "job too, so it runs beside the driver (README: Scaling the rollout pool)"},
            ),
        ),
    ),
    "check-config": Command(
        "validate a PPO config, run the pre-flight checks, print it",
        "rayrlhf.recipes.ppo:check_config", PPO, "configs/tiny-cpu.yaml",
    ),
    "check-placement": Command(
        "check that every role's bundles fit on a cluster (a shape file, or the live one)",
        "rayrlhf.cluster.capacity:check_placement_main", PPO, "configs/tiny-cpu.yaml",
        (
            Option(
                ("--cluster",),
                {"help": "cluster shape YAML (deploy/cluster-shapes/); default: the live one"},
            ),
        ),
    ),
    "make-tiny": Command(
        "build tiny tokenizer/policy/critic/reward models", "rayrlhf.models.tiny:make_tiny_main",
        options=(
            Option(("out_dir",), {}),
            Option(("--seed",), {"type": int, "default": 0}),
            Option(
                ("--size",),
                {
                    "default": "tiny",
                    "choices": ["tiny", "small", "100m", "100m-deep"],  # models.tiny.SIZES
                    "help": "tiny: 0.5M params, the demo; small: 4.5M, the arithmetic task; "
                    "100m (12 wide layers) and 100m-deep "
                    "(30 narrow layers, SmolLM-135M's shape): ~100M params, for benchmarks",
                },
            ),
            Option(
                ("--family",),
                {
                    "default": "tiny",
                    "choices": ["tiny", "llama3", "qwen2", "qwen3", "mistral"],  # FAMILY_NAMES
                    "help": "tiny: the demo's Llama and tokenizer; llama3, qwen2, qwen3, mistral: "
                    "that architecture, random weights, a tokenizer with the real one's special "
                    "tokens, pad (none for llama3 and mistral) and chat template",
                },
            ),
        ),
    ),
}  # fmt: skip


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def config_help(model: type | None = None, prefix: str = "") -> str:
    """Every config field with its type, default and docstring, as dotted names."""
    model = model or _load(PPO)
    lines = []
    for name, field in model.model_fields.items():
        # An optional section (e.g. `critic: CriticConfig | None`) documents its model's fields.
        ann = next(
            (
                a
                for a in (field.annotation, *get_args(field.annotation))
                if isinstance(a, type) and hasattr(a, "model_fields")
            ),
            field.annotation,
        )
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            lines.append(f"{prefix}{name}: {field.description or ''}")
            lines.append(config_help(ann, f"{prefix}{name}."))
            continue
        default = "required" if field.is_required() else repr(field.default)
        text = (field.description or "").replace("\n", "\n      ")
        lines.append(f"  {prefix}{name} = {default}\n      {text}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayrlhf",
        description="Distributed RLHF on Ray: DeepSpeed ZeRO-3 trainers, vLLM rollouts.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if cmd.config:
            p.add_argument("--config", help=f"YAML recipe (default: the embedded {cmd.default})")
            p.add_argument(
                "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                help="override a field, e.g. --set policy.lr=1e-5 (repeatable)",
            )  # fmt: skip
            p.add_argument(
                "--help-config", action="store_true", help="list every config field and exit"
            )
        for opt in cmd.options:
            p.add_argument(*opt.flags, **opt.kwargs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    cmd = COMMANDS[args.pop("command")]
    if args.pop("help_config", False):
        print(config_help(_load(cmd.config)))
        return 0
    try:
        if cmd.config:  # a typo fails in a second, before the recipe imports torch and Ray
            load_recipe(_load(cmd.config), PurePath(cmd.default).name, args["config"],
                        args["overrides"])  # fmt: skip
        return _load(cmd.main)(**args) or 0
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"rayrlhf: {err}", file=sys.stderr)
        return 2
    except RoleFailed as fault:  # `rayrlhf train` says its own line; the other recipes' here
        print(f"rayrlhf: {fault} (details: {_error_file(fault)})", file=sys.stderr)
        return 1


def _error_file(error: BaseException) -> str:
    """Write `error`'s whole chain (Ray's remote traceback) to a file of its own; its path."""
    fd, path = tempfile.mkstemp(prefix="rayrlhf-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write("".join(traceback.format_exception(error)))
    return path


if __name__ == "__main__":
    sys.exit(main())
