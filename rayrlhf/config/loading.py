"""Loading a recipe: YAML file (or an embedded default) + `--set` overrides -> a validated model,
every problem a `ConfigError` naming the field or the file:line:column."""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from rayrlhf.config.base import ConfigError

M = TypeVar("M", bound=BaseModel)
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def set_dotted(tree: dict, dotted: str, value: object) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
        tree = node
    tree[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, object]]:
    """Turn `a.b=value` strings into (path, value), parsing the value as YAML (1e-5, true, null)."""
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects section.key=value, got {pair!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"--set {pair}: the value is not valid YAML: {_yaml_problem(err)}"
            ) from None
        if isinstance(value, str) and _SCIENTIFIC.match(value):  # YAML 1.1 reads 1e-5 as text
            value = float(value)
        out.append((key.strip(), value))
    return out


def load_recipe(model: type[M], default: str, path: str | Path | None, overrides=()) -> M:
    """Load a YAML recipe (default: the embedded `configs/<default>`), apply `--set` overrides,
    validate it as `model`. Every command (train, sft, rm, dpo, pipeline) loads through here."""
    tree = read_yaml(path, default)
    for key, value in parse_overrides(list(overrides)):
        set_dotted(tree, key, value)
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def read_yaml(path: str | Path | None, default: str) -> dict:
    """The recipe's mapping: `path`, or the embedded `configs/<default>`. A missing file, a
    directory, bad YAML (named by file:line:column) or a non-mapping is a `ConfigError`."""
    if path is None:
        where = f"configs/{default} (embedded)"
        text = importlib.resources.files("rayrlhf").joinpath("configs", default).read_text()
    else:
        where = str(path)
        if not Path(path).exists():
            raise ConfigError(f"--config {path}: no such file")
        if not Path(path).is_file():
            raise ConfigError(f"--config {path}: not a file (a YAML recipe, e.g. configs/*.yaml)")
        text = Path(path).read_text()
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(
            f"{where}{_yaml_position(err)}: not valid YAML: {_yaml_problem(err)}"
        ) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: the top level must be a mapping")
    return tree


def _yaml_position(err: yaml.YAMLError) -> str:
    """ ":line:column" (1-based) of a YAML error, where PyYAML knows it."""
    mark = getattr(err, "problem_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _yaml_problem(err: yaml.YAMLError) -> str:
    parts = [getattr(err, "context", None), getattr(err, "problem", None)]
    return ", ".join(p for p in parts if p) or str(err).splitlines()[0]


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each naming the dotted field path."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(
            f"{field}: {msg}" if e["type"] != "extra_forbidden" else f"{field}: unknown key"
        )
    return "invalid config:\n  " + "\n  ".join(lines)
