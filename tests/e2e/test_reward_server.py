"""PPO scoring through `rayrlhf serve-reward` in a separate process, on the real stack (Ray,
ZeRO-3, vLLM), in one run (each run costs a stack start): it trains on the server's scores alone
(reward.model_path null) for two steps; then the server is stopped (SIGTERM: a clean exit) and
the run fails naming the URL within its time-out.

The served rule is the demo's gold rule, wrapped to log each call's batch size to a file: that
log is how the test knows the scores came through the server and when to stop it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import ray

from rayrlhf.config import load_config
from rayrlhf.recipes.ppo import train
from rayrlhf.runtime.run_dir import read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RULE = """
import os
from rayrlhf.data.demo_task import positive_word_fraction


def logged(prompts, responses, rows):
    with open(os.environ["REWARD_CALLS"], "a") as f:
        f.write(f"{len(responses)} {sorted({k for r in rows for k in r})}\\n")
    return positive_word_fraction(prompts, responses)
"""
TIMEOUT_S, RETRIES, BACKOFF_S = 3.0, 1, 0.2


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()


def start_server(tmp_path: Path) -> tuple[subprocess.Popen, str, Path]:
    """`rayrlhf serve-reward` on a free port; (process, /score URL, the call log)."""
    (tmp_path / "served_rule.py").write_text(textwrap.dedent(RULE))
    calls = tmp_path / "calls.txt"
    env = {
        **os.environ, "REWARD_CALLS": str(calls),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]),
    }  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "rayrlhf.cli", "serve-reward", "--rule", "served_rule:logged",
         "--port", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    for line in proc.stdout:
        if match := re.search(r"http://127\.0\.0\.1:\d+/score", line):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep it drained
            return proc, match.group(0), calls
    raise AssertionError(f"server exited {proc.wait()} before printing its URL")


def config(tiny_models, run_dir: Path, url: str, steps: int):
    return load_config(None, [
        f"run_dir={run_dir}", "make_tiny_models=null", f"steps={steps}", "save_final=false",
        f"policy.model_path={tiny_models['policy']}", "policy.num_ranks=1",
        f"critic.model_path={tiny_models['critic']}", "reward.model_path=null",
        f"reward.remote.url={url}", f"reward.remote.timeout_s={TIMEOUT_S}",
        f"reward.remote.retries={RETRIES}", f"reward.remote.backoff_s={BACKOFF_S}",
        "reward.remote.batch_size=4", "algorithm.rollout_batch_size=8",
        "algorithm.num_mini_batches=1", "algorithm.ppo_epochs=1", "metrics.port=0",
    ])  # fmt: skip


def test_ppo_scores_through_the_server_and_fails_naming_it_when_it_dies(
    tiny_models, ray_instance, tmp_path
):
    server, url, calls = start_server(tmp_path)
    stopped_at: list[float] = []

    def stop_after_two_steps() -> None:
        while not (calls.exists() and len(calls.read_text().splitlines()) >= 4):  # 2 x 8 / 4
            if server.poll() is not None:
                return
            time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        stopped_at.append(time.monotonic())

    stopper = threading.Thread(target=stop_after_two_steps)
    stopper.start()
    try:
        with pytest.raises(Exception) as err:
            train(config(tiny_models, tmp_path / "run", url, steps=30))
        failed_at = time.monotonic()
    finally:
        stopper.join(timeout=60)
        exit_code = server.wait(30)
        server.kill()
    assert stopped_at, "the run ended before the server was stopped"
    assert exit_code == 0  # SIGTERM: a clean stop
    # The scores came through the server: two whole steps, each its 8 rows in calls of 4.
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [0, 1], records
    logged = calls.read_text().splitlines()
    assert len(logged) == 4 and all(line == "4 []" for line in logged), logged
    assert all(0.0 <= r["rollout/reward_mean"] <= 1.0 for r in records)  # the rule's range

    assert url in str(err.value), str(err.value)[-2000:]
    # Refused connections fail at once: the back-off, the rest of a step, Ray's error path.
    budget = TIMEOUT_S * (RETRIES + 1) + BACKOFF_S * (2**RETRIES - 1)
    assert failed_at - stopped_at[0] < budget + 30, failed_at - stopped_at[0]
