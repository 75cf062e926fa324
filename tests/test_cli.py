"""Bad input at the command line exits 2 with one `rayrlhf:` line naming the field or the file
and line, before Ray starts; a used run_dir is refused unless asked for. In-process: the exit
code mapping is `rayrlhf.cli.main`'s (the subprocess ones are in tests/test_config.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from rayrlhf.cli import main

REPO = Path(__file__).resolve().parents[1]


def _models(tiny_models) -> list[str]:
    sets = [f"{r}.model_path={tiny_models[r]}" for r in ("policy", "critic", "reward")]
    return [a for s in [*sets, "make_tiny_models=null"] for a in ("--set", s)]


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert not ray.is_initialized()  # refused before Ray starts
    return code, err


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "cfg.yaml"
    bad.write_text("run_dir: runs/x\nsteps: 3\npolicy:\n  model_path: [models/tiny\n")
    code, err = _run(capsys, "check-config", "--config", str(bad))
    assert code == 2
    assert err.startswith(f"rayrlhf: {bad}:") and "not valid YAML" in err
    assert int(err.split(":")[2]) >= 4  # PyYAML reports the unclosed list at line 4 or later


@pytest.mark.parametrize("make", ["missing", "directory"])
def test_a_config_that_is_not_a_file_exits_2(tmp_path, capsys, make):
    path = tmp_path / "cfg"
    if make == "directory":
        path.mkdir()
    code, err = _run(capsys, "train", "--config", str(path))
    assert code == 2 and f"--config {path}" in err


@pytest.mark.parametrize("command", ["train", "check-config"])
def test_a_prompt_beyond_the_models_context_names_its_line(tiny_models, tmp_path, capsys, command):
    policy = tmp_path / "policy"
    import shutil

    shutil.copytree(tiny_models["policy"], policy)
    config = json.loads((policy / "config.json").read_text())
    config["max_position_embeddings"] = 40
    (policy / "config.json").write_text(json.dumps(config))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Tell me about the cat."}\n{"prompt": "%s"}\n' % ("cat " * 30))
    sets = [f"policy.model_path={policy}", f"data.prompts={prompts}", f"run_dir={tmp_path}/r"]
    code, err = _run(
        capsys, command, *_models(tiny_models), *(a for s in sets for a in ("--set", s))
    )
    assert code == 2
    assert f"{prompts}:2: prompt has" in err and "max_position_embeddings" in err
    assert not (tmp_path / "r").exists()


def test_a_critic_directory_without_config_json_exits_2(tiny_models, tmp_path, capsys):
    (tmp_path / "critic").mkdir()
    code, err = _run(
        capsys, "check-config", *_models(tiny_models), "--set",
        f"critic.model_path={tmp_path / 'critic'}",
    )  # fmt: skip
    assert code == 2 and "critic.model_path:" in err and "without config.json" in err


def _used(run: Path) -> dict:
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("old: true\n")
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    return {p.name: p.read_text() for p in run.iterdir()}


def test_train_into_a_used_run_dir_is_refused_and_keeps_it(tiny_models, tmp_path, capsys):
    run = tmp_path / "run"
    before = _used(run)
    code, err = _run(capsys, "train", *_models(tiny_models), "--set", f"run_dir={run}")
    assert code == 2 and "holds a previous run" in err and "overwrite=true" in err
    assert {p.name: p.read_text() for p in run.iterdir()} == before


def test_check_config_only_notes_a_used_run_dir(tiny_models, tmp_path, capsys):
    run = tmp_path / "run"
    _used(run)
    code, err = _run(capsys, "check-config", *_models(tiny_models), "--set", f"run_dir={run}")
    assert code == 0 and err.startswith("note: run_dir:") and "holds a previous run" in err


@pytest.mark.parametrize("command", ["sft", "rm", "dpo"])
def test_zero3_commands_refuse_a_used_run_dir_before_writing_data(
    tiny_models, tmp_path, capsys, command
):
    run = tmp_path / "run"
    before = _used(run)
    sets = [f"run_dir={run}", "make_tiny_models=null"]
    sets.append(f"{'policy.' if command == 'dpo' else ''}model_path={tiny_models['policy']}")
    code, err = _run(capsys, command, *(a for s in sets for a in ("--set", s)))
    assert code == 2 and "holds a previous run" in err
    assert {p.name: p.read_text() for p in run.iterdir()} == before  # no data/ written


def test_the_pipeline_refuses_a_run_dir_with_a_stage_in_it(tmp_path, capsys):
    run = tmp_path / "pipe"
    _used(run / "sft")
    code, err = _run(capsys, "pipeline", "--set", f"run_dir={run}")
    assert code == 2 and str(run / "sft" / "config.yaml") in err


def test_the_demo_script_overwrites_its_run_dir():
    """`bash scripts/demo.sh` must work when run twice: it asks for the overwrite."""
    assert "--set overwrite=true" in (REPO / "scripts" / "demo.sh").read_text()
