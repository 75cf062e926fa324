"""`rayrlhf` command line: train | dpo | best-of-n | sft | rm | pipeline | make-tiny |
check-config | check-placement.

Exit codes: 0 success, 1 the run failed, 2 bad input (config, paths, data) found before Ray starts.
"""

from __future__ import annotations

import argparse
import sys
from typing import get_args

from rayrlhf.config import ConfigError, TrainConfig, load_config
from rayrlhf.data.prompts import DataError

EXAMPLES = r"""examples:
  rayrlhf pipeline --config configs/tiny-cpu-pipeline.yaml    # SFT -> RM -> PPO (the demo)
  rayrlhf train                                   # PPO alone: the embedded tiny CPU recipe
  rayrlhf train --config configs/tiny-cpu.yaml --set algorithm.rollout_batch_size=16 --set steps=5
  rayrlhf check-config --config configs/tiny-cpu.yaml
  rayrlhf check-placement --config configs/llama3-8b-2x8xa100.yaml \
      --cluster deploy/cluster-shapes/llama3-8b-2x8xa100.yaml
  rayrlhf make-tiny models/tiny
  rayrlhf dpo --config configs/dpo-tiny-cpu.yaml --set epochs=1
  rayrlhf best-of-n --config configs/tiny-cpu.yaml --n 8 --prompts 64
  rayrlhf sft --config configs/sft-tiny-cpu.yaml
  rayrlhf rm --config configs/rm-tiny-cpu.yaml --set epochs=1
"""

# name -> (help, default recipe, "module:ConfigClass", "module:main function")
STAGE_COMMANDS = {
    "sft": ("supervised fine-tuning on demonstrations", "configs/sft-tiny-cpu.yaml",
            "rayrlhf.sft:SFTConfig", "rayrlhf.sft:sft_main"),
    "rm": ("train a reward model on preference pairs", "configs/rm-tiny-cpu.yaml",
           "rayrlhf.rm:RMConfig", "rayrlhf.rm:rm_main"),
    "pipeline": ("SFT -> reward model -> PPO into one run directory",
                 "configs/tiny-cpu-pipeline.yaml", "rayrlhf.pipeline:PipelineConfig",
                 "rayrlhf.pipeline:pipeline_main"),
}  # fmt: skip


def config_help(model: type = TrainConfig, prefix: str = "") -> str:
    """Every config field with its type, default and docstring, as dotted names."""
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
        lines.append(f"  {prefix}{name} = {default}\n      {field.description or ''}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayrlhf",
        description="Distributed RLHF on Ray: DeepSpeed ZeRO-3 trainers, vLLM rollouts.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train", "run PPO"), ("check-config", "validate a config and print it")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", help="YAML recipe (default: the embedded configs/tiny-cpu.yaml)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a field, e.g. --set policy.lr=1e-5 (repeatable)",
        )
        p.add_argument(
            "--help-config", action="store_true", help="list every config field and exit"
        )
    place = sub.add_parser(
        "check-placement",
        help="check that every role's bundles fit on a cluster (a shape file, or the live one)",
    )
    place.add_argument("--config", help="YAML recipe (default: the embedded tiny CPU recipe)")
    place.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set rollout.num_engines=16 (repeatable)",
    )
    place.add_argument(
        "--cluster", help="cluster shape YAML (deploy/cluster-shapes/); default: the live cluster"
    )
    dpo = sub.add_parser("dpo", help="run DPO on preference pairs")
    bon = sub.add_parser("best-of-n", help="sample n responses per prompt, keep the reward's best")
    for p, default in ((dpo, "configs/dpo-tiny-cpu.yaml"), (bon, "configs/tiny-cpu.yaml")):
        p.add_argument("--config", help=f"YAML recipe (default: the embedded {default})")
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a field, e.g. --set policy.lr=1e-4 (repeatable)",
        )  # fmt: skip
    dpo.add_argument("--help-config", action="store_true", help="list every DPO config field")
    bon.add_argument("--n", type=int, default=8, help="samples per prompt (default 8)")
    bon.add_argument("--prompts", type=int, default=64, help="prompts to answer (default 64)")
    for name, (text, default, _, _) in STAGE_COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", help=f"YAML recipe (default: the embedded {default})")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--help-config", action="store_true", help="list every config field")
    tiny = sub.add_parser("make-tiny", help="build tiny tokenizer/policy/critic/reward models")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--size",
        default="tiny",
        choices=["tiny", "100m", "100m-deep"],  # models.tiny.SIZES; not imported: slow
        help="tiny: 0.5M params, the demo; 100m (12 wide layers) and 100m-deep (30 narrow "
        "layers, SmolLM-135M's shape): ~100M params, for benchmarks",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "make-tiny":
        from rayrlhf.models.tiny import make_tiny

        make_tiny(args.out_dir, seed=args.seed, size=args.size)
        return 0
    if args.command == "check-placement":
        from rayrlhf.cluster.capacity import check_placement_main

        return check_placement_main(args.config, args.overrides, args.cluster)
    if args.command == "dpo":
        from rayrlhf.dpo import DPOConfig, dpo_main

        if args.help_config:
            print(config_help(DPOConfig))
            return 0
        return dpo_main(args.config, args.overrides)
    if args.command in STAGE_COMMANDS:
        return _stage_main(args)
    if args.command == "best-of-n":
        from rayrlhf.best_of_n import best_of_n_main

        return best_of_n_main(args.config, args.overrides, args.n, args.prompts)
    if args.help_config:
        print(config_help())
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "check-config":
            from rayrlhf.preflight import preflight

            preflight(cfg)
            print(cfg.model_dump_json(indent=2))
            return 0
        from rayrlhf.trainer import train

        train(cfg)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"rayrlhf: {err}", file=sys.stderr)
        return 2
    return 0


def _stage_main(args: argparse.Namespace) -> int:
    """`rayrlhf sft | rm | pipeline`: import the stage's module only when it is asked for."""
    import importlib

    _, _, config_cls, main_fn = STAGE_COMMANDS[args.command]
    if args.help_config:
        module, _, name = config_cls.partition(":")
        print(config_help(getattr(importlib.import_module(module), name)))
        return 0
    module, _, name = main_fn.partition(":")
    return getattr(importlib.import_module(module), name)(args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
