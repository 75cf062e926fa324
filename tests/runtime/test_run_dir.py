"""Run directories: a relaunch never destroys a run, metrics lines are written whole and read
back past a torn last line, and model saves are complete or absent."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rayrlhf.config import ConfigError, load_config
from rayrlhf.models.saving import atomic_dir
from rayrlhf.runtime import run_dir as rd
from rayrlhf.runtime.run_dir import (
    MetricsWriter,
    TornMetricsWarning,
    check_run_dir,
    previous_run,
    read_metrics,
    write_run_config,
)


def _cfg(run, *sets):
    return load_config(None, [f"run_dir={run}", *sets])


def _used(run):
    """A finished run's directory: config, two metrics lines, a policy and a plot."""
    (run / "policy").mkdir(parents=True)
    (run / "policy" / "config.json").write_text("{}")
    (run / "config.yaml").write_text("old: true\n")
    (run / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n')
    (run / "reward.png").write_bytes(b"png")
    return run


# ---- a relaunch into a used run_dir --------------------------------------------------------


def test_a_new_or_empty_directory_is_free_and_a_stage_directory_marks_it_used(tmp_path):
    assert previous_run(tmp_path / "new") is None
    assert previous_run(tmp_path) is None
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "metrics.jsonl").write_text("")
    assert previous_run(tmp_path) == tmp_path / "sft" / "metrics.jsonl"


def test_a_fresh_run_into_a_used_directory_is_refused_and_touches_nothing(tmp_path):
    run = _used(tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as err:
        write_run_config(_cfg(run), run)
    msg = str(err.value)
    assert "run_dir:" in msg and str(run / "config.yaml") in msg
    assert "overwrite=true" in msg and "--resume" in msg
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_overwrite_clears_the_old_outputs_but_keeps_inputs_inside_run_dir(tmp_path):
    run = _used(tmp_path / "run")
    prompts = run / "inputs" / "prompts.jsonl"
    prompts.parent.mkdir()
    prompts.write_text('{"prompt": "hi"}\n')
    cfg = _cfg(run, "overwrite=true", f"data.prompts={prompts}")
    write_run_config(cfg, run)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "inputs"]
    assert prompts.read_text() == '{"prompt": "hi"}\n'
    assert "old: true" not in (run / "config.yaml").read_text()


def test_resume_keeps_the_directory_as_it_is(tmp_path):
    run = _used(tmp_path / "run")
    cfg = SimpleNamespace(run_dir=str(run), overwrite=False, resume=True)
    check_run_dir(cfg)  # no error
    assert (run / "metrics.jsonl").read_text() == '{"step": 0}\n{"step": 1}\n'


def test_the_pipeline_keeps_only_inputs_outside_its_stage_directories(tmp_path):
    from rayrlhf.recipes.pipeline import load_pipeline_config

    run = tmp_path / "pipe"
    for stage in ("sft", "rm", "ppo"):
        (run / stage / "model").mkdir(parents=True)
        (run / stage / "config.yaml").write_text("x: 1\n")
    cfg = load_pipeline_config(None, [f"run_dir={run}"])  # rm.model_path is run/sft/model
    with pytest.raises(ConfigError, match="holds a previous run"):
        check_run_dir(cfg)
    cfg = load_pipeline_config(None, [f"run_dir={run}", "overwrite=true"])
    write_run_config(cfg, run, outputs=("sft", "rm", "ppo", "ppo_init"))
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


# ---- metrics.jsonl -------------------------------------------------------------------------


def test_metrics_are_appended_never_deleted(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    log = MetricsWriter(tmp_path, tensorboard=False)
    log.write({"step": 1, "x": 2.0})
    assert read_metrics(tmp_path) == [{"step": 0}, {"step": 1, "x": 2.0}]


def test_each_record_is_one_whole_write(tmp_path, monkeypatch):
    writes = []
    real = rd.os.write
    monkeypatch.setattr(rd.os, "write", lambda fd, b: writes.append(b) or real(fd, b))
    log = MetricsWriter(tmp_path, tensorboard=False)
    log.write({"step": 0, "text": "x" * 10_000})
    assert len(writes) == 1 and writes[0].endswith(b"\n")
    assert json.loads(writes[0]) == {"step": 0, "text": "x" * 10_000}


def test_a_short_write_is_an_error_not_a_silent_torn_line(tmp_path, monkeypatch):
    monkeypatch.setattr(rd.os, "write", lambda fd, b: 3)
    with pytest.raises(OSError, match="wrote 3 of"):
        MetricsWriter(tmp_path, tensorboard=False).write({"step": 0})


def test_a_torn_last_line_is_reported_and_skipped_by_the_reader(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "x": 0.')
    with pytest.warns(TornMetricsWarning, match=r"metrics.jsonl:3: incomplete last line"):
        assert read_metrics(tmp_path) == [{"step": 0}, {"step": 1}]


def test_a_bad_line_before_the_last_names_its_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"ste\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics(tmp_path)


def test_opening_cuts_a_torn_tail_so_the_next_record_has_its_own_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "x"')
    with pytest.warns(TornMetricsWarning, match="removed an incomplete last line"):
        log = MetricsWriter(tmp_path, tensorboard=False)
    log.write({"step": 1})
    assert read_metrics(tmp_path) == [{"step": 0}, {"step": 1}]


# ---- saves: complete or absent ---------------------------------------------------------------


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "policy"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("new")
        raise RuntimeError("disk full")  # before the weights
    assert (target / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]
    (tmp_path / "policy.tmp").mkdir()  # a killed save's leftovers
    (tmp_path / "policy.tmp" / "junk").write_text("x")
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("new")
    assert [p.name for p in target.iterdir()] == ["config.json"]
    assert (target / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def _tiny_lm(path=None):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    if path is not None:
        model.save_pretrained(path)
    return model


def test_the_zero3_save_writes_beside_and_renames(tmp_path, monkeypatch, tiny_models):
    """`DeepSpeedRole.save` (the PPO policy, SFT, RM and DPO model saves) on rank 0, with the
    ZeRO-3 gather stood in for: a failing save leaves the previous model whole."""
    from rayrlhf.workers import deepspeed_role
    from rayrlhf.workers.deepspeed_role import DeepSpeedRole

    model = _tiny_lm()
    role = DeepSpeedRole.__new__(DeepSpeedRole)
    role.engine = SimpleNamespace(module=model)
    role.spec = SimpleNamespace(rank=0)
    role.model_path = str(tiny_models["policy"])
    monkeypatch.setattr(deepspeed_role, "plan_buckets", lambda metas, size: None)
    monkeypatch.setattr(deepspeed_role.zero3, "param_metas", lambda module: [])
    monkeypatch.setattr(
        deepspeed_role.zero3, "gathered_buckets",
        lambda module, plan, rank: [list(module.state_dict().items())],
    )  # fmt: skip
    out = tmp_path / "policy"
    role.save(str(out))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    loaded = LlamaForCausalLM.from_pretrained(out)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)

    import transformers

    def broken(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(OSError, match="No space"):
        role.save(str(out))
    again = LlamaForCausalLM.from_pretrained(out)  # the first save, whole
    assert torch.equal(again.lm_head.weight, loaded.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_a_failed_reward_model_init_leaves_no_directory(tmp_path, monkeypatch):
    from rayrlhf.recipes import rm

    _tiny_lm(tmp_path / "lm")

    def broken(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(rm.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(OSError):
        rm.init_reward_model(tmp_path / "lm", tmp_path / "init", seed=0)
    assert not (tmp_path / "init").exists() and not (tmp_path / "init.tmp").exists()


def test_an_interrupted_tiny_build_is_rebuilt(tmp_path, monkeypatch):
    from rayrlhf.models import tiny

    def half(out, size="tiny"):
        (out / "critic").mkdir(parents=True)
        (out / "critic" / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "make_tiny", half)
    with pytest.raises(KeyboardInterrupt):
        rd.build_tiny_models(str(tmp_path / "tiny"))
    assert not (tmp_path / "tiny" / "policy" / "config.json").exists()
    built = []

    def whole(out, size="tiny"):
        for role in ("critic", "policy"):
            (out / role).mkdir(parents=True)
            (out / role / "config.json").write_text(role)
        built.append(out)

    monkeypatch.setattr(tiny, "make_tiny", whole)
    rd.build_tiny_models(str(tmp_path / "tiny"))
    assert (tmp_path / "tiny" / "policy" / "config.json").read_text() == "policy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    rd.build_tiny_models(str(tmp_path / "tiny"))  # built: not again
    assert len(built) == 1


def test_build_tiny_models_builds_the_recipes_size(tmp_path, monkeypatch):
    built = {}

    def fake_make_tiny(out, size="tiny"):  # records the call, writes what the check reads
        built["size"] = size
        (Path(out) / "policy").mkdir(parents=True)
        (Path(out) / "policy" / "config.json").write_text("{}")

    monkeypatch.setattr("rayrlhf.models.tiny.make_tiny", fake_make_tiny)
    cfg = load_config(None, [f"run_dir={tmp_path}/run", "make_tiny_size=small"])
    rd.build_tiny_models(str(tmp_path / "models"), cfg.make_tiny_size)
    assert built == {"size": "small"} and (tmp_path / "models/policy/config.json").exists()
    rd.build_tiny_models(str(tmp_path / "models"), "small")  # already there: not rebuilt
    assert built == {"size": "small"}
