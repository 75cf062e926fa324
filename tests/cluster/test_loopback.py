"""The local Ray listens on loopback only, and its token file is private.

Every TCP listening socket of every process of the Ray instance is checked: the one `start_ray`
starts (the CLI's and every recipe's local Ray, in a subprocess so that this process's Ray state
is untouched), and the README's single-machine head, its commands read from README.md, with an
own temp dir, ports and home. Each instance is stopped by ending its own processes: `ray stop`
would stop every Ray instance on the machine.
"""

from __future__ import annotations

import ipaddress
import os
import re
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from rayrlhf.cluster.placement import private_token
from rayrlhf.cluster.rendezvous import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CHILD = """
import time
from rayrlhf.cluster.placement import start_ray
start_ray(None, 2)
print("ready", flush=True)
time.sleep(600)
"""


def _env(home: Path) -> dict[str, str]:
    """A user's plain shell: no cluster to join, no token given, `home` as the home."""
    drop = ("RAY_ADDRESS", "RAY_JOB_ID", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "HOME": str(home), "PATH": f"{BIN}:{env.get('PATH', '')}"}


def _tree(roots: list[psutil.Process]) -> list[psutil.Process]:
    procs = {p.pid: p for r in roots for p in (r, *r.children(recursive=True))}
    return list(procs.values())


def _open_to_others(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return not (mapped or addr).is_loopback


def _offenders(procs: list[psutil.Process]) -> tuple[int, list[str]]:
    """(listening sockets, those not on loopback as 'name pid ip:port')."""
    total, bad = 0, []
    for p in procs:
        try:
            name = p.name()
            conns = p.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                total += 1
                if _open_to_others(c.laddr.ip):
                    bad.append(f"{name} {p.pid} {c.laddr.ip}:{c.laddr.port}")
    return total, bad


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE  # a zombie is reaped by its own parent
    except psutil.NoSuchProcess:
        return False


def _end(procs: list[psutil.Process]) -> None:
    """SIGKILL: the instance holds nothing to save, and Ray's GCS takes over 10 s on SIGTERM."""
    for p in filter(_alive, procs):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + 10
    while any(map(_alive, procs)) and time.monotonic() < deadline:
        time.sleep(0.2)


def _wait_line(proc: subprocess.Popen, want: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if line.strip() == want:
                return
            if not line:
                break
    raise AssertionError(f"no {want!r} from the child within {timeout_s:.0f}s: {proc.poll()}")


def _settle() -> None:
    """The agents and metrics servers come up a moment after start-up returns."""
    time.sleep(1.5)


@pytest.mark.slow
def test_start_ray_listens_on_loopback_only(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        env=_env(tmp_path),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    tree = [psutil.Process(child.pid)]
    try:
        _wait_line(child, "ready", 120)
        _settle()
        tree = _tree(tree)
        total, bad = _offenders(tree)
    finally:
        _end(_tree(tree))
        child.wait(10)
    assert total >= 5, f"only {total} listening sockets found: is this Ray's process tree?"
    assert not bad, f"listening beyond loopback: {bad}"
    assert (tmp_path / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600


def readme_head_script() -> str:
    """The README's single-machine head, from its first command to `ray start --head`, one
    command a line (continuations joined); `source scripts/env.sh` left out (PATH is set)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    block = next(b for b in blocks if "ray start --head" in b)
    lines = [re.sub(r"\s+#.*$", "", line) for line in block.replace("\\\n", " ").splitlines()]
    end = next(i for i, line in enumerate(lines) if "ray start --head" in line)
    return "\n".join(line for line in lines[: end + 1] if not line.startswith("source "))


def _own_head_args(temp: str) -> str:
    """Ports and a temp dir of the test's own, so that it shares nothing with another Ray."""
    gcs, dash, agent = free_port(), free_port(), free_port()
    args = ["--temp-dir", temp, "--port", gcs, "--dashboard-port", dash]
    args += ["--dashboard-agent-listen-port", agent, "--disable-usage-stats"]
    return " " + shlex.join(str(a) for a in args)


def _pids_naming(temp: str) -> list[psutil.Process]:
    mine = {os.getpid()}
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if p.pid not in mine and temp in " ".join(p.info["cmdline"] or []):
            out.append(p)
    return out


@pytest.mark.slow
def test_readme_head_listens_on_loopback_only(tmp_path):
    script = readme_head_script()
    assert "ray start --head" in script.splitlines()[-1]
    temp = tempfile.mkdtemp(prefix="rr-lo-", dir="/tmp")  # AF_UNIX paths: 107 bytes at most
    script += _own_head_args(temp)
    try:
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            env=_env(tmp_path),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert run.returncode == 0, (script, run.stderr[-3000:])
        _settle()
        total, bad = _offenders(_tree(_pids_naming(temp)))
    finally:
        _end(_tree(_pids_naming(temp)))
        shutil.rmtree(temp, ignore_errors=True)
    assert total >= 5, f"only {total} listening sockets found: is this Ray's process tree?"
    assert not bad, f"listening beyond loopback: {bad}"
    assert (tmp_path / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600


def test_private_token_tightens_a_wide_file(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("abc")
    token.chmod(0o644)
    private_token(token)
    assert token.stat().st_mode & 0o777 == 0o600
    assert token.read_text() == "abc"


def test_private_token_writes_a_new_one_private(tmp_path, monkeypatch):
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    token = tmp_path / ".ray" / "auth_token"
    private_token(token)
    assert token.stat().st_mode & 0o777 == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())


def test_private_token_writes_none_when_auth_is_off_or_given(tmp_path, monkeypatch):
    token = tmp_path / ".ray" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    private_token(token)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "elsewhere"))
    private_token(token)
    assert not token.exists()
