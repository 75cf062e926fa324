"""The pipeline's config wiring and the new CLI subcommands' input errors (no Ray needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayrlhf.cli import main
from rayrlhf.config import ConfigError
from rayrlhf.recipes.pipeline import load_pipeline_config, ppo_config

ROOT = Path(__file__).resolve().parents[2]


def test_stages_write_into_sub_directories_and_ppo_points_at_them(tmp_path):
    cfg = load_pipeline_config(
        ROOT / "configs/tiny-cpu-pipeline.yaml", [f"run_dir={tmp_path}", "sft.run_dir=elsewhere"]
    )
    assert cfg.sft.run_dir == str(tmp_path / "sft") and cfg.sft.make_tiny_models is None
    assert cfg.rm.run_dir == str(tmp_path / "rm")
    assert cfg.rm.model_path == str(tmp_path / "sft/model")  # the RM starts from the SFT policy
    ppo = ppo_config(cfg)
    assert ppo.run_dir == str(tmp_path / "ppo") and ppo.steps == 40
    assert ppo.policy.model_path == ppo.reference.model_path == str(tmp_path / "sft/model")
    assert ppo.critic.model_path == str(tmp_path / "ppo_init/critic")
    assert ppo.reward.model_path == str(tmp_path / "rm/model")
    assert ppo.make_tiny_models is None


def test_an_explicit_rm_start_and_ppo_overrides_are_kept(tmp_path):
    cfg = load_pipeline_config(
        ROOT / "configs/tiny-cpu-pipeline.yaml",
        [f"run_dir={tmp_path}", "rm.model_path=models/tiny/reward", "ppo_overrides=[steps=3]"],
    )
    assert cfg.rm.model_path == "models/tiny/reward"
    assert ppo_config(cfg).steps == 3


def test_bad_ppo_override_fails_before_any_stage(tmp_path):
    cfg = load_pipeline_config(
        ROOT / "configs/tiny-cpu-pipeline.yaml", [f"run_dir={tmp_path}", "ppo_overrides=[x=1]"]
    )
    with pytest.raises(ConfigError, match="x: unknown key"):
        ppo_config(cfg)


@pytest.mark.parametrize("command", ["sft", "rm", "pipeline"])
def test_unknown_key_exits_2(command, capsys):
    assert main([command, "--set", "nope=1"]) == 2
    assert "nope: unknown key" in capsys.readouterr().err


def test_bad_sft_row_exits_2_naming_file_and_line(tiny_models, tmp_path, capsys):
    data = tmp_path / "demos.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "response": "ok"}) + '\n{"prompt": "hi"}\n')
    argv = ["sft", "--config", str(ROOT / "configs/sft-tiny-cpu.yaml")]
    for o in (f"run_dir={tmp_path}/run", f"model_path={tiny_models['policy']}",
              "make_tiny_models=null", "synthetic_demos=null", f"data.train={data}"):  # fmt: skip
        argv += ["--set", o]
    assert main(argv) == 2
    assert f"{data}:2: missing key 'response'" in capsys.readouterr().err


def test_rm_batch_arithmetic_is_checked():
    with pytest.raises(ConfigError, match="batch_size=30 must be divisible by"):
        from rayrlhf.recipes.rm import load_rm_config

        load_rm_config(ROOT / "configs/rm-tiny-cpu.yaml", ["batch_size=30"])
