"""`rayrlhf serve-reward`: the CLI server in a subprocess answers /score for a rule (rows,
extras, invalid samples) and for the tiny reward model (its own tokenizer's ids), stops cleanly
on SIGTERM, and refuses bad input with exit 2; the app's error replies, in process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rayrlhf.recipes.serve_reward import RuleScorer, ServeRewardConfig, build_app

ROOT = Path(__file__).resolve().parents[2]
RULES = '''
def answer_match(prompts, responses, rows):
    """Reads the row's answer; sample 'skip' is invalid (None)."""
    out = []
    for response, row in zip(responses, rows):
        if response == "skip":
            out.append({"score": None, "matched": 0.0})
        else:
            hit = float(response == row["answer"])
            out.append({"score": hit, "matched": hit, "columns": float(len(row))})
    return out


def broken(prompts, responses, rows):
    raise KeyError("answer")
'''


@pytest.fixture
def rules(tmp_path):
    (tmp_path / "my_rules.py").write_text(textwrap.dedent(RULES))
    return tmp_path


def _env(path: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(path)])}


@contextmanager
def server(*args: str, env: dict | None = None):
    """The CLI server on a free port; yields (process, /score URL)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rayrlhf.cli", "serve-reward", "--port", "0", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        seen, match = "", None
        for line in proc.stdout:  # until the URL line, printed once it listens
            seen += line
            if match := re.search(r"(http://127\.0\.0\.1:\d+/score)", line):
                break
        assert match, seen
        yield proc, match.group(1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


def test_a_rule_server_scores_rows_and_stops_on_sigterm(rules):
    body = {
        "prompts": ["1+1?", "2+2?", "3+3?"],
        "responses": ["2", "5", "skip"],
        "rows": [{"answer": "2", "id": 1}, {"answer": "4", "id": 2}, {"answer": "6", "id": 3}],
    }
    with server("--rule", "my_rules:answer_match", env=_env(rules)) as (proc, url):
        assert post(url, body) == {
            "scores": [
                {"score": 1.0, "matched": 1.0, "columns": 2.0},
                {"score": 0.0, "matched": 0.0, "columns": 2.0},
                {"score": None, "matched": 0.0, "columns": None},  # invalid: the client masks it
            ]
        }
        health = json.loads(urllib.request.urlopen(url.replace("/score", "/health")).read())
        assert health == {"status": "ok", "scorer": "rule my_rules:answer_match"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "reward server stopped (SIGTERM)" in proc.stdout.read()


def test_the_tiny_reward_model_scores_text_with_its_own_tokenizer(tiny_models):
    import torch
    from transformers import AutoTokenizer

    from rayrlhf.models.forward import sequence_scores
    from rayrlhf.models.frozen import load_frozen
    from rayrlhf.workers.reward import RetokenizedRM

    prompts = ["Tell me about the cat.", "Describe music:", "Tell me about the sea."]
    responses = [" good happy kind warm", " the of a it", " nice"]
    path = str(tiny_models["reward"])
    with server("--model", path, "--micro-batch-size", "2") as (_, url):
        scores = post(url, {"prompts": prompts, "responses": responses})["scores"]
    encoder = RetokenizedRM(AutoTokenizer.from_pretrained(path))
    model = load_frozen("reward", path)
    with torch.no_grad():  # one unpadded sequence at a time
        ids = [torch.tensor([encoder.encode(p, r)]) for p, r in zip(prompts, responses)]
        expected = [sequence_scores(model, i, torch.ones_like(i)).item() for i in ids]
    assert scores == pytest.approx(expected, abs=1e-5)  # padded micro-batches change nothing
    assert scores[0] > scores[1] + 0.2  # fitted to the demo rule: kind words score higher


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rule", "my_rules:missing"], "reward function 'my_rules:missing' cannot be loaded"),
        (["--rule", "my_rules:answer_match", "--model", "x"], "give exactly one of --rule"),
        ([], "give exactly one of --rule"),
        (["--model", "/nonexistent"], "--model /nonexistent: no config.json there"),
        (["--rule", "my_rules:broken", "--port", "70000"], "port"),
    ],
)
def test_bad_input_exits_2_before_listening(rules, args, message):
    out = subprocess.run(
        [sys.executable, "-m", "rayrlhf.cli", "serve-reward", *args],
        cwd=ROOT, env=_env(rules), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert "http://" not in out.stdout


def test_a_port_in_use_is_exit_2(rules):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "rayrlhf.cli", "serve-reward", "--rule",
             "my_rules:answer_match", "--port", str(port)],
            cwd=ROOT, env=_env(rules), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr


def test_app_replies_422_to_a_bad_request_and_500_naming_a_raising_rule(rules, monkeypatch):
    monkeypatch.syspath_prepend(str(rules))
    client = TestClient(build_app(RuleScorer("my_rules:broken")))
    bad = client.post("/score", json={"prompts": ["a"], "responses": ["x", "y"]})
    assert bad.status_code == 422 and "1 prompts, 2 responses" in bad.text
    typo = client.post("/score", json={"prompt": ["a"], "responses": ["x"]})
    assert typo.status_code == 422
    raised = client.post("/score", json={"prompts": ["a"], "responses": ["x"], "rows": [{}]})
    assert raised.status_code == 500
    assert "reward function 'my_rules:broken' raised KeyError" in raised.json()["detail"]
    assert client.post("/score", json={"prompts": [], "responses": []}).json() == {"scores": []}


def test_config_defaults_bind_loopback():
    cfg = ServeRewardConfig(rule="m:f")
    assert cfg.host == "127.0.0.1"
    with pytest.raises(ValueError, match="give exactly one"):
        ServeRewardConfig(rule="m:f", model="dir")
