"""Fault matrix row "SIGKILL of the driver mid-checkpoint", for real.

A CLI run of the tiny recipe (checkpoints every 2 steps, on a Ray this test holds, so the killed
driver leaves no Ray of its own behind) is sent SIGKILL while it writes its step-4 checkpoint,
that is while `checkpoints/step_4.tmp/` exists. `--resume` must skip that directory, load the
previous complete checkpoint (step 2) and finish the run. Nothing lost: metrics and ledger hold
every step once (the killed run's lines past step 2 are dropped) and the prompts are those an
uninterrupted run draws, none twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from tiny_runs import tiny_ppo_sets
from transformers import AutoTokenizer

from rayrlhf.config import load_config
from rayrlhf.data.prompts import PromptSet
from rayrlhf.recipes.ppo import train
from rayrlhf.runtime.checkpoint import newest_complete
from rayrlhf.runtime.preflight import context_limit

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS, BATCH, EVERY = 4, 16, 2


def overrides(tiny_models, run_dir: Path) -> list[str]:
    return tiny_ppo_sets(tiny_models, run_dir, STEPS, BATCH, EVERY)


def records(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / name
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def held_ray():
    ray.init(num_cpus=8, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def written(tmp: Path) -> list[str]:
    return [str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()]


def kill_mid_checkpoint(cmd: list[str], tmp: Path, log: Path) -> str:
    """Run the CLI; SIGKILL it once the checkpoint being written in `tmp` has its first file
    (the ranks write theirs first; the driver's state and the manifest follow)."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 900
            while not (tmp.is_dir() and written(tmp)):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.005)
        finally:
            proc.kill()
            proc.wait(timeout=60)
    return log.read_text()


def test_sigkill_mid_checkpoint_resumes_from_the_previous_one(
    tiny_models, tmp_path, held_ray, capsys
):
    run = tmp_path / "run"
    ckpts, last = run / "checkpoints", STEPS  # the last step's checkpoint is killed
    sets = [*overrides(tiny_models, run), f"ray_address={held_ray}"]
    cli = [sys.executable, "-m", "rayrlhf.cli", "train", "--config", "configs/tiny-cpu.yaml"]
    log = kill_mid_checkpoint(
        cli + [a for s in sets for a in ("--set", s)], ckpts / f"step_{last}.tmp", tmp_path / "log"
    )
    # Killed in the write: a part of it on disk, never named step_N; the previous one is whole.
    assert not (ckpts / f"step_{last}").exists(), log[-3000:]
    assert written(ckpts / f"step_{last}.tmp")
    assert newest_complete(run) == ckpts / f"step_{last - EVERY}"
    assert [r["step"] for r in records(run, "ledger.jsonl")] == list(range(last))

    capsys.readouterr()
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", [*overrides(tiny_models, run), "resume=true"])
    train(cfg)
    out = capsys.readouterr().out
    assert f"resumed from {ckpts / f'step_{last - EVERY}'} (step {last - EVERY}/" in out, out

    assert [r["step"] for r in records(run, "metrics.jsonl")] == list(range(STEPS))
    ledger = records(run, "ledger.jsonl")
    assert [r["step"] for r in ledger] == list(range(STEPS))
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy.model_path)
    prompts = PromptSet.load(cfg.data, tokenizer, cfg.seed, context_limit(cfg))
    assert [r["prompts"] for r in ledger] == [prompts.indices(s, BATCH) for s in range(STEPS)]
    trained = [p for r in ledger for p in r["prompts"]]
    assert len(trained) == len(set(trained)) == STEPS * BATCH  # one epoch: no prompt twice
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step_{last - EVERY}", f"step_{last}"]
