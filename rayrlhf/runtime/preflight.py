"""Checks that run before Ray starts: a bad path, tokenizer or rule fails in seconds, not after
the actors have loaded their models."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from rayrlhf.config import ConfigError, TrainConfig
from rayrlhf.runtime.run_dir import build_tiny_models


def model_paths(cfg: TrainConfig) -> dict[str, str]:
    """The configured model directories, by field name."""
    paths = {
        "policy.model_path": cfg.policy.model_path,
        "critic.model_path": cfg.active_critic and cfg.active_critic.model_path,
        "reference.model_path": cfg.reference.model_path,
        "reward.model_path": cfg.reward.model_path,
    }
    return {k: v for k, v in paths.items() if v is not None}


def check_paths(cfg: TrainConfig) -> None:
    """Every model directory and data file exists."""
    paths = model_paths(cfg)
    if cfg.data.prompts != "demo":
        paths["data.prompts"] = cfg.data.prompts
    for field, value in paths.items():
        if not Path(value).exists():
            raise ConfigError(f"invalid config:\n  {field}: path does not exist: {value}")


def check_tokenizers(cfg: TrainConfig) -> None:
    """All models read the policy's token ids, so their vocabularies must be identical."""
    paths = model_paths(cfg)
    base = AutoTokenizer.from_pretrained(paths.pop("policy.model_path")).get_vocab()
    for field, path in paths.items():
        try:
            vocab = AutoTokenizer.from_pretrained(path).get_vocab()
        except (OSError, ValueError):
            continue  # no tokenizer saved with this model: nothing to compare
        if vocab != base:
            differing = sum(1 for tok, i in vocab.items() if base.get(tok) != i)
            raise ConfigError(
                f"invalid config:\n  {field}: its tokenizer does not match policy.model_path's "
                f"({len(vocab)} vs {len(base)} tokens, {differing} mapped differently); "
                "every role reads the policy's token ids"
            )


def check_rule(cfg: TrainConfig) -> None:
    """The rule reward imports."""
    if cfg.reward.rule:
        from rayrlhf.workers.reward import resolve_rule

        try:
            resolve_rule(cfg.reward.rule)
        except ValueError as err:
            raise ConfigError(f"invalid config:\n  reward.rule: {err}") from None


def local_gpu_gib() -> float | None:
    """Memory of this machine's first GPU, when a run without a cluster address will start its
    roles here; None otherwise (a cluster's GPUs are not the driver's)."""
    import os

    import torch

    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def check_layout_and_memory(cfg: TrainConfig, gpu_gib: float | None = None) -> None:
    """The engines are placed in a way vLLM can start (`engine_layout`), and, when the roles
    will run on this machine's GPUs (`gpu_gib`), each role's memory plan fits one of them. A
    cluster's GPU memory is checked by `rayrlhf check-placement --cluster <shape>`."""
    from rayrlhf.cluster.memory import check_memory, plan_memory
    from rayrlhf.cluster.placement import PlacementError, engine_layout

    try:
        engine_layout(cfg.rollout)
        if gpu_gib is not None and cfg.ray_address is None:
            check_memory(plan_memory(cfg, {}, lambda role: gpu_gib))
    except PlacementError as err:
        raise ConfigError(f"invalid config:\n  {err}") from None


def preflight(cfg: TrainConfig) -> None:
    """Every check above, after building the demo models if the recipe asks for them."""
    build_tiny_models(cfg.make_tiny_models)
    check_paths(cfg)
    check_tokenizers(cfg)
    check_rule(cfg)
    check_layout_and_memory(cfg, local_gpu_gib())
