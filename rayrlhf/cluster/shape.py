"""A cluster's shape, as the placement check and the memory plan read it: its node types, how
many of each, what one node offers to bundles, the memory of its GPUs, and the configs of the
models on its volumes.

It comes from a YAML file (`deploy/cluster-shapes/`) or from the live cluster
(`cluster.live.cluster_shape_from_ray`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rayrlhf.config import ConfigError, format_validation_error

Bundle = dict[str, float]
EPS = 1e-6  # fractional amounts (0.125 x 8) must still add up to a whole node


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class NodeType(_Model):
    name: str = Field(min_length=1)
    """Node type (a KubeRay worker group, a `ray up` node type), e.g. 'trainer' or 'rollout'."""
    count: int | None = Field(1, ge=0)
    """Nodes of this type; null means an autoscaler may add as many as the run needs."""
    num_cpus: float = Field(0.0, ge=0)
    """Logical CPUs one node advertises to Ray."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs one node advertises to Ray."""
    memory_gib: float | None = Field(None, gt=0)
    """Memory of one node, shown for reference only: bundles reserve no memory."""
    gpu_memory_gib: float | None = Field(None, gt=0)
    """Memory of one of its GPUs, for the memory plan (`cluster.memory`); None leaves the roles
    placed here unchecked (a live cluster does not report it)."""
    custom: dict[str, float] = {}
    """Ray custom resources one node advertises, e.g. {"rollout_node": 1}."""

    @model_validator(mode="after")
    def _whole_numbers(self) -> NodeType:
        if {"CPU", "GPU"} & self.custom.keys():
            raise ValueError("set CPU and GPU with num_cpus and num_gpus, not in custom")
        for key, value in self.capacity().items():
            # Ray refuses to start a node with fractional resources; bundles may be fractional.
            if value < 0 or value != int(value):
                raise ValueError(f"{key}: a node's resources are whole numbers, got {value}")
        return self

    def capacity(self) -> Bundle:
        """What one node of this type offers to placement-group bundles."""
        return {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.custom}


class ClusterShape(_Model):
    node_types: list[NodeType] = Field(min_length=1)
    """The cluster's node types, in the order first-fit tries them."""
    models: dict[str, dict[str, Any]] = {}
    """config.json fields (model_type among them) of model paths that this machine may not
    have, such as those on the cluster's /models volume, for the memory plan. In a shape file
    each may also be a path to a config.json, relative to the file."""

    @model_validator(mode="after")
    def _unique_names(self) -> ClusterShape:
        names = [t.name for t in self.node_types]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"node type names must be unique: {dupes}")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterShape:
        """Load and validate a shape file; errors name the field, like a config's."""
        try:
            tree = yaml.safe_load(Path(path).read_text())
            if isinstance(tree, dict) and isinstance(tree.get("models"), dict):
                tree["models"] = _model_configs(tree["models"], Path(path).parent)
            return cls.model_validate(tree)
        except yaml.YAMLError as err:
            raise ConfigError(f"invalid shape {path}: {err}") from None
        except ValidationError as err:
            msg = format_validation_error(err).replace("invalid config", f"invalid shape {path}", 1)
            raise ConfigError(msg) from None

    def describe(self) -> str:
        """One line per node type: count and resources per node."""
        lines = []
        for t in self.node_types:
            count = "autoscaled" if t.count is None else f"x{t.count}"
            mem = f", {num(t.memory_gib)} GiB" if t.memory_gib else ""
            mem += f", {num(t.gpu_memory_gib)} GiB a GPU" if t.gpu_memory_gib else ""
            lines.append(f"  {t.name} {count}: {fmt_bundle(nonzero(t.capacity()))} per node{mem}")
        return "\n".join(lines)


def _model_configs(models: dict, base: Path) -> dict:
    """A shape file's `models`, each a config.json's fields: inline, or read from a path
    relative to the shape file."""
    out = {}
    for path, config in models.items():
        if isinstance(config, str):
            try:
                config = json.loads((base / config).read_text())
            except (OSError, ValueError) as err:
                raise ConfigError(f"models.{path}: cannot read {base / config}: {err}") from None
        out[path] = config
    return out


def ordered(keys) -> list[str]:
    """CPU, GPU, then custom resource names sorted: the order every message uses."""
    keys = set(keys)
    return [k for k in ("CPU", "GPU") if k in keys] + sorted(keys - {"CPU", "GPU"})


def nonzero(b: Bundle) -> Bundle:
    return {k: v for k, v in b.items() if v > EPS}


def num(x: float) -> str:
    return f"{x:g}"


def fmt_bundle(b: Bundle) -> str:
    """{CPU: 1, GPU: 4, rollout_node: 0.5}: CPU and GPU first, then custom names sorted."""
    return "{" + ", ".join(f"{k}: {num(b[k])}" for k in ordered(b)) + "}"
