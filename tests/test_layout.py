"""The architecture, checked: the dependency rule between packages, file sizes, and lint.

    types, config  <-  algorithms, data, models  <-  cluster  <-  weight_sync  <-  workers
        <-  runtime  <-  recipes  <-  cli

A module may import from its own layer and the layers to its left, never to its right. The
maths in algorithms/ imports no Ray, DeepSpeed or vLLM, so it runs and tests anywhere.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rayrlhf"
LAYERS = [
    {"types", "config"},
    {"algorithms", "data", "models"},
    {"cluster"},
    {"weight_sync"},
    {"workers"},
    {"runtime"},
    {"recipes"},
    {"cli"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
HEAVY = ("ray", "deepspeed", "vllm")
MAX_LINES = 500


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.stat().st_size)


def _part(path: Path) -> str:
    """The top-level part of rayrlhf a file belongs to: 'cli', 'recipes', ..."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in the file, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module))
            if node.module == "rayrlhf":  # `from rayrlhf import recipes`
                out += [(node.lineno, f"rayrlhf.{a.name}") for a in node.names]
    return out


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(p) for p in _modules()} - {"__init__"}
    assert parts <= LAYER.keys(), f"no layer for {sorted(parts - LAYER.keys())}"


def test_imports_follow_the_dependency_rule():
    wrong = []
    for path in _modules():
        own = _part(path)
        if own == "__init__":
            continue
        for line, module in _imports(path):
            names = module.split(".")
            if names[0] != "rayrlhf" or len(names) < 2:
                continue
            if LAYER[names[1]] > LAYER[own]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "imports against the dependency rule:\n" + "\n".join(wrong)


def test_algorithms_import_no_ray_deepspeed_or_vllm():
    heavy = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in (PACKAGE / "algorithms").rglob("*.py")
        for line, module in _imports(path)
        if module.split(".")[0] in HEAVY
    ]
    assert not heavy, "\n".join(heavy)


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: a worker importing a recipe is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from rayrlhf.recipes.ppo import train\n")
    assert _imports(bad) == [(2, "rayrlhf.recipes.ppo")]
    assert LAYER["recipes"] > LAYER["workers"]


def test_no_file_is_over_500_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(args):
    paths = ["rayrlhf", "tests", "benchmarks"]
    out = subprocess.run(
        [sys.executable, "-m", "ruff", *args, *paths], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
