import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rayrlhf.cli import config_help
from rayrlhf.config import ConfigError, TrainConfig, load_config, parse_overrides
from rayrlhf.runtime import preflight

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "configs" / "tiny-cpu.yaml"
SECTIONS = ("policy", "critic", "reference", "reward", "rollout", "data", "algorithm", "sync")


def _base(**sections):
    """A minimal valid config tree; each section can be overridden."""
    tree = {
        "run_dir": "runs/test",
        "policy": {"model_path": "p", "num_ranks": 1, "micro_batch_size": 2},
        "critic": {"model_path": "c", "num_ranks": 1, "micro_batch_size": 2},
        "reward": {"model_path": "r"},
        "algorithm": {"rollout_batch_size": 8, "num_mini_batches": 1},
    }
    tree.update(sections)
    return tree


def _write(tmp_path, tree):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


# ---- valid configs ---------------------------------------------------------------------------


def test_embedded_default_validates():
    cfg = load_config(None)
    assert isinstance(cfg, TrainConfig)
    # The embedded default is the tiny CPU recipe.
    assert cfg.policy.model_path == "models/tiny/policy"
    assert cfg.reward.model_path == "models/tiny/reward"


def test_repo_tiny_cpu_yaml_validates_and_matches_embedded():
    cfg = load_config(TINY_YAML)
    assert cfg == load_config(None)
    # Values taken from the YAML file, not the model defaults.
    assert cfg.policy.num_ranks == 2 and cfg.policy.micro_batch_size == 8
    assert cfg.algorithm.rollout_batch_size == 32 and cfg.algorithm.num_mini_batches == 2
    assert cfg.policy.lr == pytest.approx(5e-4)
    # The recipe really divides: 32 % (8 * 2 * 2) == 0 and 32 % (8 * 1 * 2) == 0.
    assert cfg.algorithm.rollout_batch_size % (8 * 2 * 2) == 0


# ---- errors name the dotted field --------------------------------------------------------------


def test_unknown_top_level_key(tmp_path):
    tree = _base()
    tree["stepz"] = 3
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, tree))
    assert "stepz" in str(err.value)
    assert "unknown key" in str(err.value)


def test_unknown_key_inside_section(tmp_path):
    tree = _base()
    tree["policy"]["lrr"] = 1e-5
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, tree))
    assert "policy.lrr" in str(err.value)
    assert "unknown key" in str(err.value)


def test_unknown_key_via_override():
    with pytest.raises(ConfigError, match=r"policy\.lrr: unknown key"):
        load_config(None, ["policy.lrr=1e-5"])


def test_unknown_key_in_nested_resources():
    with pytest.raises(ConfigError, match=r"critic\.resources\.num_gpu\b"):
        load_config(None, ["critic.resources.num_gpu=1"])


@pytest.mark.parametrize("value", ["-1", "0"])
def test_non_positive_rollout_batch_size(value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"algorithm.rollout_batch_size={value}"])
    assert "algorithm.rollout_batch_size" in str(err.value)


def test_negative_micro_batch_size_names_field():
    with pytest.raises(ConfigError, match=r"critic\.micro_batch_size"):
        load_config(None, ["critic.micro_batch_size=-4"])


def test_rollout_batch_not_divisible_names_policy_micro_batch(tmp_path):
    # policy: 3 x 1 ranks x 1 mini-batch = 3 does not divide 8; critic (2) does.
    tree = _base(policy={"model_path": "p", "num_ranks": 1, "micro_batch_size": 3})
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, tree))
    msg = str(err.value)
    assert "policy.micro_batch_size" in msg
    assert "algorithm.rollout_batch_size" in msg
    assert "critic.micro_batch_size" not in msg


def test_divisibility_counts_ranks_and_mini_batches(tmp_path):
    # 8 is divisible by micro_batch 2 alone, but not by 2 x 2 ranks x 4 mini-batches = 16.
    tree = _base(
        policy={"model_path": "p", "num_ranks": 2, "micro_batch_size": 2},
        algorithm={"rollout_batch_size": 8, "num_mini_batches": 4},
    )
    with pytest.raises(ConfigError, match="policy.micro_batch_size"):
        load_config(_write(tmp_path, tree))
    # 16 = 2 x 2 x 4 divides; the critic (2 x 1 x 4 = 8) divides too.
    tree["algorithm"]["rollout_batch_size"] = 16
    cfg = load_config(_write(tmp_path, tree))
    assert cfg.algorithm.rollout_batch_size == 16


def test_critic_divisibility_names_critic(tmp_path):
    tree = _base(critic={"model_path": "c", "num_ranks": 1, "micro_batch_size": 3})
    with pytest.raises(ConfigError, match=r"critic\.micro_batch_size"):
        load_config(_write(tmp_path, tree))


def test_reward_needs_a_source(tmp_path):
    tree = _base(reward={})
    with pytest.raises(ConfigError, match="reward"):
        load_config(_write(tmp_path, tree))


def test_non_mapping_top_level(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


# ---- --set overrides ---------------------------------------------------------------------------


def test_overrides_parse_yaml_values_through_load_config():
    cfg = load_config(
        None,
        [
            "policy.lr=1e-5",
            "rollout.enforce_eager=false",
            "rollout.kv_cache_gib=null",
            "make_tiny_models=null",
            "steps=7",
        ],
    )
    assert isinstance(cfg.policy.lr, float) and cfg.policy.lr == 1e-5
    assert cfg.rollout.enforce_eager is False
    assert cfg.rollout.kv_cache_gib is None
    assert cfg.make_tiny_models is None
    assert cfg.steps == 7


def test_parse_overrides_true_null_and_int():
    parsed = dict(parse_overrides(["a.b=true", "c=null", "d.e=3", "f=text", "g= 2.5"]))
    assert parsed == {"a.b": True, "c": None, "d.e": 3, "f": "text", "g": 2.5}
    assert parsed["a.b"] is True


def test_parse_overrides_scientific_notation_is_float():
    ((key, value),) = parse_overrides(["policy.lr=1e-5"])
    assert key == "policy.lr"
    assert isinstance(value, float) and value == 1e-5


def test_override_bool_string_reaches_bool_field():
    assert load_config(None, ["metrics.plots=true"]).metrics.plots is True
    assert load_config(None, ["metrics.plots=false"]).metrics.plots is False


def test_sync_verify_every_is_a_positive_period():
    assert load_config(None, []).sync.verify_every == 1  # every byte of every sync by default
    assert load_config(None, ["sync.verify_every=10"]).sync.verify_every == 10
    with pytest.raises(ConfigError, match="verify_every"):
        load_config(None, ["sync.verify_every=0"])  # the first sync is always hashed


@pytest.mark.parametrize("bad", ["policy.lr", "=3", "policy.lr:3"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides([bad])


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="steps"):
        load_config(None, ["steps.x=1"])


# ---- preflight ---------------------------------------------------------------------------------


def _cfg_with_paths(paths, **extra):
    return TrainConfig.model_validate(
        {
            "run_dir": "runs/test",
            "policy": {"model_path": str(paths["policy"]), "num_ranks": 1, "micro_batch_size": 1},
            "critic": {"model_path": str(paths["critic"]), "num_ranks": 1, "micro_batch_size": 1},
            "reward": {"model_path": str(paths["reward"])},
            "algorithm": {"rollout_batch_size": 4},
            **extra,
        }
    )


def test_check_paths_missing_policy(tiny_models, tmp_path):
    paths = dict(tiny_models, policy=tmp_path / "no-such-policy")
    cfg = _cfg_with_paths(paths)
    with pytest.raises(ConfigError) as err:
        preflight.check_paths(cfg)
    assert "policy.model_path" in str(err.value)
    assert str(tmp_path / "no-such-policy") in str(err.value)


def test_check_paths_missing_data_file(tiny_models, tmp_path):
    cfg = _cfg_with_paths(tiny_models, data={"prompts": str(tmp_path / "missing.jsonl")})
    with pytest.raises(ConfigError, match=r"data\.prompts"):
        preflight.check_paths(cfg)


def test_check_paths_and_tokenizers_pass_on_tiny_models(tiny_models):
    cfg = _cfg_with_paths(tiny_models)
    preflight.check_paths(cfg)
    preflight.check_tokenizers(cfg)


def test_check_tokenizers_mismatch_names_critic_and_spares_reward(tiny_models, tmp_path):
    from rayrlhf.models.tiny import train_tokenizer

    small = train_tokenizer(vocab_size=300)
    assert len(small.get_vocab()) != len(_vocab(tiny_models["policy"]))
    for role in ("critic", "reward"):
        shutil.copytree(tiny_models[role], tmp_path / role)
        small.save_pretrained(tmp_path / role)
    cfg = _cfg_with_paths(dict(tiny_models, critic=tmp_path / "critic"))
    with pytest.raises(ConfigError) as err:
        preflight.check_tokenizers(cfg)
    msg = str(err.value)
    assert "critic.model_path" in msg
    assert "reward.model_path" not in msg  # the reward's tokenizer does match
    # A reward model may have its own tokenizer: it re-encodes decoded text.
    preflight.check_tokenizers(_cfg_with_paths(dict(tiny_models, reward=tmp_path / "reward")))


def test_check_tokenizers_skips_model_without_tokenizer(tiny_models, tmp_path):
    bare = tmp_path / "critic-no-tokenizer"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_models["critic"] / f, bare / f)
    preflight.check_tokenizers(_cfg_with_paths(dict(tiny_models, critic=bare)))  # no error


@pytest.mark.parametrize("rule", ["no_such_module_xyz:score", "rayrlhf.data.demo_task:no_such_fn"])
def test_check_rule_names_reward_rule(tiny_models, rule):
    cfg = _cfg_with_paths(tiny_models, reward={"rule": rule})
    with pytest.raises(ConfigError, match=r"reward\.rule"):
        preflight.check_rule(cfg)
    good_rule = "rayrlhf.data.demo_task:positive_word_fraction"
    ok = _cfg_with_paths(tiny_models, reward={"rule": good_rule})
    preflight.check_rule(ok)


def _vocab(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()


# ---- CLI ---------------------------------------------------------------------------------------


def _cli(*args):
    """Run the CLI. No wall-clock bound beyond the hang guard: on a loaded 2-core CI machine
    importing torch and transformers alone took 35-47 s (6 s idle). What keeps a bad input fast
    is failing before Ray starts, which the tests check in the output."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "rayrlhf.cli", "train", "--config", "configs/tiny-cpu.yaml", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc


@pytest.mark.parametrize(
    "args, field",
    [
        (["--set", "policy.bogus=1"], "policy.bogus"),
        (["--set", "algorithm.rollout_batch_size=0"], "algorithm.rollout_batch_size"),
        (
            ["--set", "policy.model_path=/nonexistent", "--set", "make_tiny_models=null"],
            "policy.model_path",
        ),
    ],
)
def test_cli_bad_input_exits_2_before_ray(args, field):
    proc = _cli(*args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert field in proc.stderr
    assert "Traceback" not in out
    assert "Started a local Ray instance" not in out
    assert "ray.init" not in out


def _bad_prompts(tmp_path, fmt):
    """Prompts whose row 1 (0-based) is malformed, as `fmt`; (path, how errors name the row)."""
    rows = [{"prompt": "Tell me about the cat."}, {"prompt": ""}]
    if fmt == "jsonl":
        path = tmp_path / "prompts.jsonl"
        path.write_text('{"prompt": "Tell me about the cat."}\n{"prompt": 3}\n')
        return path, f"{path}:2: "
    import datasets

    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / ("prompts.parquet" if fmt == "parquet" else "prompts")
    if fmt == "parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    return path, f"{path} row 1: 'prompt' is empty"


@pytest.mark.parametrize(
    "fmt, field",
    # every format for the training prompts; the eval set goes through the same reader
    [("jsonl", "data.prompts"), ("parquet", "data.prompts"), ("saved", "data.prompts"),
     ("saved", "eval.prompts")],
)  # fmt: skip
def test_cli_bad_prompt_row_exits_2_naming_file_and_row(tiny_models, tmp_path, fmt, field):
    data, named = _bad_prompts(tmp_path, fmt)
    proc = _cli(
        "--set",
        f"policy.model_path={tiny_models['policy']}",
        "--set",
        f"critic.model_path={tiny_models['critic']}",
        "--set",
        f"reward.model_path={tiny_models['reward']}",
        "--set",
        "make_tiny_models=null",
        "--set",
        f"{field}={data}",
        "--set",
        "eval.every_steps=5",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert named in proc.stderr
    assert "Traceback" not in out
    assert "Started a local Ray instance" not in out


# ---- data, eval and metrics sections -------------------------------------------------------


def test_data_eval_and_metrics_defaults():
    cfg = load_config(None, [])
    d = cfg.data
    assert (d.prompts, d.chat_template, d.overlong, d.on_bad_row) == (
        "demo",
        "auto",
        "error",
        "error",
    )
    assert (cfg.eval.every_steps, cfg.eval.prompts, cfg.eval.greedy) == (0, "demo", True)
    assert cfg.metrics.tensorboard is True


@pytest.mark.parametrize("word", ["on", "off"])
def test_a_bare_on_or_off_is_the_chat_template_mode_not_a_boolean(word):
    # YAML 1.1 reads `off` as False; the mode must still be the word the user wrote.
    assert load_config(None, [f"data.chat_template={word}"]).data.chat_template == word


@pytest.mark.parametrize(
    "override, field",
    [
        ("data.chat_template=maybe", "data.chat_template"),
        ("data.overlong=truncate", "data.overlong"),
        ("data.on_bad_row=ignore", "data.on_bad_row"),
        ("eval.every_steps=-1", "eval.every_steps"),
        ("eval.num_prompts=0", "eval.num_prompts"),
        ("eval.bogus=1", "eval.bogus"),
        ("metrics.tensorboard=sometimes", "metrics.tensorboard"),
    ],
)
def test_bad_data_eval_and_metrics_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=rf"{field}: "):
        load_config(None, [override])


def test_config_help_lists_sections_and_docstrings():
    text = config_help()
    for section in SECTIONS:
        assert f"  {section}." in text, section
    for field in (
        "policy.lr",
        "algorithm.kl_coef",
        "sync.bucket_mb",
        "policy.resources.num_cpus",
        "steps",
        "run_dir",
    ):
        assert field in text, field
    assert "AdamW learning rate" in text
    assert "KL coefficient (beta) against the reference" in text
    # every leaf field of the model appears as a dotted name
    assert text.count("policy.model_path = required") == 1


def test_unknown_estimator_and_kl_names_list_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["algorithm.advantage=ppo2"])
    msg = str(err.value)
    assert "algorithm.advantage" in msg
    for name in ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"):
        assert name in msg
    with pytest.raises(ConfigError, match=r"algorithm.kl_estimator.*'k1', 'k2' or 'k3'"):
        load_config(None, ["algorithm.kl_estimator=k4"])


def test_critic_free_config_needs_no_critic_and_gae_does():
    cfg = load_config(
        None, ["algorithm.advantage=rloo", "algorithm.n_samples_per_prompt=4", "critic=null"]
    )
    assert cfg.active_critic is None
    with pytest.raises(ConfigError, match="critic: required by algorithm.advantage=gae"):
        load_config(None, ["critic=null"])


def test_adaptive_kl_start_outside_its_bounds_is_rejected():
    with pytest.raises(ConfigError, match=r"kl_coef=0.01 must lie within \[kl_coef_min=0.02"):
        load_config(
            None,
            [
                "algorithm.kl_controller=adaptive",
                "algorithm.kl_coef=0.01",
                "algorithm.kl_coef_min=0.02",
            ],
        )


def test_a_role_may_get_more_threads_than_cpus_but_an_engine_may_not():
    from rayrlhf.cluster.placement import threads_for

    cfg = load_config(None, ["policy.resources.num_threads=2", "make_tiny_models=null"])
    assert threads_for(cfg.policy.resources) == 2 and threads_for(cfg.critic.resources) == 1
    with pytest.raises(ConfigError, match="rollout.resources: vLLM binds its own threads"):
        load_config(None, ["rollout.resources.num_threads=2"])


# ---- reward.judge ------------------------------------------------------------------------------


def test_judge_alone_is_a_reward_source_and_reserves_its_own_bundles():
    from rayrlhf.cluster.capacity import cpus_needed, role_bundles

    judge = {"model_path": "j", "num_engines": 2, "resources": {"num_cpus": 3}}
    cfg = TrainConfig.model_validate(_base(reward={"judge": judge}))
    assert cfg.reward.model_path is None and cfg.reward.judge.num_engines == 2
    roles = {r.role: r for r in role_bundles(cfg)}
    assert roles["judge"].count == 2 and roles["judge"].bundle == {"CPU": 3.0}
    without = TrainConfig.model_validate(_base())
    assert cpus_needed(cfg) == cpus_needed(without) + 6
    assert "judge" not in {r.role for r in role_bundles(without)}


@pytest.mark.parametrize(
    "judge, field, words",
    [
        ({"template": "{prompt} {answer}"}, "reward.judge.template", "unknown placeholders"),
        ({"template": "{prompt} only"}, "reward.judge.template", "{response}"),
        ({"template": "{} {response}"}, "reward.judge.template", "positional"),
        ({"template": "{response"}, "reward.judge.template", "expected '}'"),
        ({"score_pattern": r"(\d+)/(\d+)"}, "reward.judge.score_pattern", "exactly one group"),
        ({"score_pattern": r"score (\d+"}, "reward.judge.score_pattern", "not a regular"),
        ({"max_score": None}, "reward.judge", "both min_score and max_score"),
        ({"min_score": 5, "max_score": 1}, "reward.judge", "below max_score"),
        ({"resources": {"num_threads": 2}}, "reward.judge.resources", "VLLM_CPU_OMP"),
        ({"modelpath": "x"}, "reward.judge.modelpath", "unknown key"),
    ],
)
def test_judge_config_errors_name_the_field(tmp_path, judge, field, words):
    tree = _base(reward={"judge": {"model_path": "j", **judge}})
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, tree))
    assert field in str(err.value) and words in str(err.value)


def test_judge_template_keeps_literal_braces_and_set_overrides_reach_it():
    cfg = load_config(
        None,
        [
            "reward.judge.model_path=j",
            "reward.judge.template='{{json}} {prompt} -> {response}'",  # quoted: YAML
            "reward.judge.min_score=null",
            "reward.judge.max_score=null",
        ],
    )
    assert cfg.reward.judge.template.format(prompt="p", response="r") == "{json} p -> r"
    assert cfg.reward.judge.min_score is None and cfg.reward.model_path is not None


def test_preflight_checks_the_judge_model_dir_and_tokenizer(tiny_models, tmp_path):
    missing = _cfg_with_paths(tiny_models, reward={"judge": {"model_path": str(tmp_path / "no")}})
    with pytest.raises(ConfigError, match=r"reward\.judge\.model_path: path does not exist"):
        preflight.check_paths(missing)
    bare = tmp_path / "bare"  # a model without a tokenizer: the judge could not read text
    shutil.copytree(tiny_models["policy"], bare)
    for name in bare.glob("tokenizer*"):
        name.unlink()
    cfg = _cfg_with_paths(tiny_models, reward={"judge": {"model_path": str(bare)}})
    preflight.check_paths(cfg)
    with pytest.raises(ConfigError, match=r"reward\.judge\.model_path: .* no tokenizer"):
        preflight.check_judge(cfg)
    ok = {"model_path": str(tiny_models["policy"]), "chat_template": True}
    preflight.check_judge(_cfg_with_paths(tiny_models, reward={"judge": ok}))


def test_judge_model_dir_missing_exits_2_before_ray(tiny_models, tmp_path):
    models = [f"{role}.model_path={tiny_models[role]}" for role in ("policy", "critic", "reward")]
    sets = [*models, "make_tiny_models=null", f"reward.judge.model_path={tmp_path / 'no-judge'}"]
    proc = _cli(*(a for s in sets for a in ("--set", s)), "--set", f"run_dir={tmp_path / 'run'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "reward.judge.model_path: path does not exist" in proc.stderr
    assert "Traceback" not in out and "Started a local Ray instance" not in out
