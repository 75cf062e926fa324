"""The image builds' single source of versions: pyproject.toml.

    python verify_pins.py requirements gpu      # the pinned requirement lines of deps + extras
    python verify_pins.py pin torch             # one pinned version (2.13.0)
    python verify_pins.py check cpu dev --absent torchvision torchaudio torchcodec

`check` exits 1 naming every installed version that differs from its pin (a local label such as
+cpu is allowed) and every package in --absent that is installed. Standard library only: it runs
before anything else is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

_PIN = re.compile(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)$")


def requirement_lines(pyproject: Path, extras: list[str]) -> list[str]:
    """The `dependencies` of pyproject.toml plus those of the given extras, as written there."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    return list(project["dependencies"]) + [d for e in extras for d in optional[e]]


def pinned(pyproject: Path, extras: list[str]) -> dict[str, str]:
    """{distribution name: version} for the dependencies and the given extras."""
    out = {}
    for line in requirement_lines(pyproject, extras):
        m = _PIN.match(line.replace(" ", ""))
        if not m:
            raise SystemExit(f"not an exact pin (name==version): {line!r}")
        out[m.group(1)] = m.group(3)
    return out


def mismatches(pins: dict[str, str], absent: list[str]) -> list[str]:
    """Human-readable differences between the installed packages and the pins."""
    problems = []
    for name, want in pins.items():
        try:
            have = version(name)
        except PackageNotFoundError:
            problems.append(f"{name}: not installed, pyproject.toml pins {want}")
            continue
        if have.split("+")[0] != want:
            problems.append(f"{name}: installed {have}, pyproject.toml pins {want}")
    for name in absent:
        try:
            problems.append(f"{name}: installed {version(name)}, should be absent")
        except PackageNotFoundError:
            pass
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["requirements", "pin", "check"])
    parser.add_argument("names", nargs="*", help="extras (requirements, check) or a package (pin)")
    parser.add_argument("--absent", nargs="*", default=[], help="packages that must not be there")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)
    if args.command == "requirements":
        print("\n".join(requirement_lines(args.pyproject, args.names)))
        return 0
    if args.command == "pin":
        print(pinned(args.pyproject, [])[args.names[0]])
        return 0
    problems = mismatches(pinned(args.pyproject, args.names), args.absent)
    for p in problems:
        print(f"verify_pins: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
