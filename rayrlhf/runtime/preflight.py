"""Checks that run before Ray starts: a bad path, tokenizer or rule fails in seconds, not after
the actors have loaded their models. Each failure is a `ConfigError` (exit 2) naming the field,
or a `DataError` naming the file and line.

    paths        every model directory exists and holds a config.json; every data file is a
                 file, or a `datasets.save_to_disk` directory
    tokenizers   every role reads the policy's token ids: same vocabulary, or (a model saved
                 without a tokenizer) an embedding with a row for each of the policy's tokens;
                 a reward model with a tokenizer of its own is re-encoded instead
    context      the policy's context (max_position_embeddings) leaves room for a response of
                 rollout.max_new_tokens; each prompt is checked against what is left
                 (`context_limit`, applied where the prompts load)
    judge        reward.judge.model_path holds a model and a tokenizer of its own (it reads
                 text), with a chat template if reward.judge.chat_template asks for one
    rule, layout and memory
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from rayrlhf.config import ConfigError, TrainConfig
from rayrlhf.data.jsonl import DataError
from rayrlhf.data.prompts import ContextLimit, PromptSet
from rayrlhf.data.sources import check_source
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


def check_model_dir(field: str, path: str | Path) -> None:
    """`path` is a Hugging Face model directory (it holds a config.json)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"invalid config:\n  {field}: path does not exist: {path}")
    if not (path / "config.json").is_file():
        what = "a directory without config.json" if path.is_dir() else "a file"
        raise ConfigError(
            f"invalid config:\n  {field}: {path} is {what}, not a Hugging Face model directory "
            "(`save_pretrained` writes config.json beside the weights)"
        )


def check_data_path(field: str, path: str | Path) -> None:
    """`path` can be read as data: a file, or a `datasets.save_to_disk` directory."""
    try:
        check_source(path)
    except DataError as err:
        raise ConfigError(f"invalid config:\n  {field}: {err}") from None


def check_paths(cfg: TrainConfig) -> None:
    """Every model directory holds a model, every data file the run reads can be read."""
    for field, value in model_paths(cfg).items():
        check_model_dir(field, value)
    if cfg.reward.judge is not None:
        check_model_dir("reward.judge.model_path", cfg.reward.judge.model_path)
    data = {"data.prompts": cfg.data.prompts}
    if cfg.eval.every_steps or getattr(cfg.eval, "at_start", False):
        data["eval.prompts"] = cfg.eval.prompts
    for field, value in data.items():
        if value != "demo":
            check_data_path(field, value)


def _own_tokenizer(path: str):
    """The tokenizer saved with the model at `path`, or None if there is none."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_embedding(field: str, path: str, tokens: int, whose: str) -> None:
    """The model at `path` has an embedding row for each of `tokens` ids (`whose` tokenizer's),
    so no id it is given indexes past its table (an IndexError mid-run otherwise)."""
    config = AutoConfig.from_pretrained(path)
    rows = getattr(config.get_text_config(), "vocab_size", None)
    if rows is not None and rows < tokens:
        raise ConfigError(
            f"invalid config:\n  {field}: {path} has {rows} embedding rows, fewer than the "
            f"{tokens} tokens of {whose}: token ids from {rows} up would fail mid-run"
        )


def check_tokenizers(cfg: TrainConfig) -> None:
    """Every role reads the policy's token ids, so every vocabulary must be the policy's. A
    model saved without a tokenizer reads them as they are (by design), so its embedding must
    cover them; a reward model with a tokenizer of its own is fed re-encoded text (its worker
    decodes and re-encodes), so it may differ."""
    paths = model_paths(cfg)
    policy_path = paths.pop("policy.model_path")
    policy = AutoTokenizer.from_pretrained(policy_path)
    base, size = policy.get_vocab(), len(policy)
    check_embedding("policy.model_path", policy_path, size, "its own tokenizer")
    for field, path in paths.items():
        own = _own_tokenizer(path)
        if own is None:
            check_embedding(field, path, size, f"the policy's tokenizer ({policy_path})")
            print(
                f"pre-flight: {field} {path} has no tokenizer saved with it: it reads the "
                "policy's token ids, so it must have been trained with the policy's tokenizer",
                flush=True,
            )
            continue
        vocab = own.get_vocab()
        if vocab != base and field != "reward.model_path":
            differing = sum(1 for tok, i in vocab.items() if base.get(tok) != i)
            raise ConfigError(
                f"invalid config:\n  {field}: its tokenizer does not match policy.model_path's "
                f"({len(vocab)} vs {len(base)} tokens, {differing} mapped differently); "
                "every role but the reward model reads the policy's token ids"
            )


def check_judge(cfg: TrainConfig) -> None:
    """The judge reads text with its own tokenizer: it must have one (and a chat template when
    reward.judge.chat_template is on). Its vocabulary may differ from the policy's."""
    judge = cfg.reward.judge
    if judge is None:
        return
    field = "reward.judge.model_path"
    tokenizer = _own_tokenizer(judge.model_path)
    if tokenizer is None:
        raise ConfigError(
            f"invalid config:\n  {field}: {judge.model_path} has no tokenizer saved with it; "
            "the judge reads text (save one beside the weights)"
        )
    if judge.chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"invalid config:\n  reward.judge.chat_template: {judge.model_path}'s tokenizer "
            "has no chat template; set reward.judge.chat_template=false"
        )


def context_limit(cfg: TrainConfig) -> ContextLimit | None:
    """The most prompt tokens the policy's context leaves beside a response of
    rollout.max_new_tokens; None when its config states no context length or cannot be read
    (`check_paths` reports a missing model). A context that leaves no room is a `ConfigError`."""
    try:
        config = AutoConfig.from_pretrained(cfg.policy.model_path).get_text_config()
    except (OSError, ValueError):
        return None
    context = getattr(config, "max_position_embeddings", None)
    if not isinstance(context, int):
        return None
    new = cfg.rollout.max_new_tokens
    why = (
        f"policy.model_path's context of {context} tokens (max_position_embeddings) less "
        f"rollout.max_new_tokens={new}"
    )
    if context - new < 1:
        raise ConfigError(f"invalid config:\n  rollout.max_new_tokens: {why} leaves no room")
    return ContextLimit(context - new, why)


def check_prompts(cfg: TrainConfig) -> None:
    """Load the training and evaluation prompts as the run will (rows, template, lengths):
    what `rayrlhf check-config` adds to `preflight`; a run loads them itself."""
    from rayrlhf.runtime.evaluation import load_eval_prompts

    tokenizer = AutoTokenizer.from_pretrained(cfg.policy.model_path)
    PromptSet.load(cfg.data, tokenizer, cfg.seed, context_limit(cfg))
    if cfg.eval.every_steps or getattr(cfg.eval, "at_start", False):
        load_eval_prompts(cfg, tokenizer)


def check_rule(cfg: TrainConfig) -> None:
    """Every reward function (reward.rule, reward.rules) imports."""
    from rayrlhf.workers.reward import resolve_rule

    rules = cfg.reward.all_rules()
    fields = (["reward.rule"] if cfg.reward.rule else []) + [
        f"reward.rules[{i}]" for i in range(len(cfg.reward.rules))
    ]
    for field, rule in zip(fields, rules):
        try:
            resolve_rule(rule.fn)
        except ValueError as err:
            raise ConfigError(f"invalid config:\n  {field}: {err}") from None


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
    build_tiny_models(cfg.make_tiny_models, cfg.make_tiny_size)
    check_paths(cfg)
    check_tokenizers(cfg)
    check_judge(cfg)
    context_limit(cfg)
    check_rule(cfg)
    check_layout_and_memory(cfg, local_gpu_gib())
