"""The preference driver: its config (validated before Ray starts), its input preparation, and
which roles it starts for each loss."""

import json
from pathlib import Path

import pytest

from rayrlhf.cluster.actors import ActorSet
from rayrlhf.config import ConfigError
from rayrlhf.data.preferences import PreferenceSet
from rayrlhf.recipes import dpo
from rayrlhf.recipes.dpo import load_dpo_config, prepare_inputs

RECIPES = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def tokenizer_only(tmp_path_factory) -> Path:
    """A model directory holding the tiny tokenizer and an empty config.json: enough to pass the
    model-directory check and load data, not to train."""
    from rayrlhf.models.tiny import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer().save_pretrained(out)
    (out / "config.json").write_text("{}")
    return out


BASE = ["policy.model_path=models/tiny/policy", "synthetic_pairs=64"]


def test_embedded_recipe_is_valid():
    cfg = load_dpo_config()
    assert cfg.synthetic_pairs and cfg.make_tiny_models and cfg.loss == "dpo"
    assert cfg.batch_size % (cfg.policy.micro_batch_size * cfg.policy.num_ranks) == 0


@pytest.mark.parametrize(
    "recipe, loss, uses_reference",
    [
        ("dpo", "dpo", True),
        ("kto", "kto", True),
        ("orpo", "orpo", False),
        ("simpo", "simpo", False),
    ],
)
def test_each_loss_has_a_valid_recipe(recipe, loss, uses_reference):
    cfg = load_dpo_config(RECIPES / f"{recipe}-tiny-cpu.yaml")
    assert cfg.loss == loss and cfg.loss_entry.uses_reference is uses_reference
    assert cfg.synthetic_pairs and cfg.run_dir == f"runs/tiny-{recipe}"


@pytest.mark.parametrize("loss", ["ipo", "cdpo", "kto", "orpo", "simpo"])
def test_every_loss_runs_from_the_dpo_recipe_with_one_override(loss):
    cfg = load_dpo_config(None, [f"loss={loss}"])
    assert cfg.loss == loss


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (["batch_size=30"], "batch_size=30 must be divisible by policy.micro_batch_size"),
        (["loss_type=ipo"], "loss_type is now loss: sigmoid -> loss=dpo"),
        (["label_smoothing=0.2"], "label_smoothing applies to loss=cdpo only, not loss=dpo"),
        (["loss=kto", "simpo_gamma=1"], "simpo_gamma applies to loss=simpo only"),
        (["loss=simpo", "kto_desirable_weight=2"], "kto_desirable_weight applies to loss=kto"),
        (["loss=orpo", "reference.micro_batch_size=4"], "loss=orpo uses no reference model"),
        (["data.train=pairs.jsonl"], "set synthetic_pairs or data.train/data.eval, not both"),
        (["synthetic_pairs=null"], "set data.train"),
        (["loss=hinge"], "loss: Input should be 'dpo', 'ipo', 'cdpo', 'kto', 'orpo' or 'simpo'"),
        (["loss=cdpo", "label_smoothing=0.5"], "label_smoothing: Input should be less than 0.5"),
        (["policy.lrr=1"], "policy.lrr: unknown key"),
        (["beta=0"], "beta: Input should be greater than 0"),
    ],
)
def test_invalid_config_names_the_field(tmp_path, overrides, problem):
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(
        "run_dir: runs/t\nbatch_size: 32\npolicy:\n  micro_batch_size: 8\n  num_ranks: 2\n"
    )
    with pytest.raises(ConfigError) as err:
        load_dpo_config(recipe, BASE + overrides)
    assert problem in str(err.value)


def test_missing_data_file_names_the_field(tmp_path):
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy/config.json").write_text("{}")  # passes the model-directory check
    cfg = load_dpo_config(
        None,
        [
            f"policy.model_path={tmp_path / 'policy'}",
            "make_tiny_models=null",
            "synthetic_pairs=null",
            f"data.train={tmp_path / 'nope.jsonl'}",
        ],
    )
    with pytest.raises(ConfigError, match="data.train: .*nope.jsonl: no such file"):
        prepare_inputs(cfg)


def _synthetic_inputs(tmp_path, *overrides: str):
    """prepare_inputs of the embedded recipe with 40 synthetic pairs into tmp_path/run."""
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy/config.json").write_text("{}")  # passes the model-directory check
    cfg = load_dpo_config(
        None,
        [
            f"policy.model_path={tmp_path / 'policy'}",
            "make_tiny_models=null",
            "synthetic_pairs=40",
            f"run_dir={tmp_path / 'run'}",
            *overrides,
        ],
    )
    return prepare_inputs(cfg)


def test_synthetic_pairs_are_written_into_the_run_dir(tmp_path):
    train, held_out = _synthetic_inputs(tmp_path)
    assert train == tmp_path / "run" / "data" / "train.jsonl"
    assert len(train.read_text().splitlines()) == 40
    assert len(held_out.read_text().splitlines()) == 100


class _Rank:
    """Stands in for a policy rank: returns (first token, -first token) of each chosen row."""

    def __init__(self, seen: list[int]) -> None:
        self.seen = seen
        self.forward_pair_logps = self  # so that `.forward_pair_logps.remote(b)` works

    def remote(self, batch):
        self.seen.append(len(batch))
        first = batch.chosen_sequences[:, -1].float()  # the chosen response's one token
        return first, -first


class _Actors(ActorSet):
    def get(self, refs, phase):
        return refs


@pytest.mark.parametrize("num_pairs, ranks", [(7, 2), (5, 3), (9, 2), (1, 4)])
def test_set_logps_gives_every_rank_an_equal_shard_and_drops_the_padding(
    monkeypatch, num_pairs, ranks
):
    monkeypatch.setattr(dpo, "CHUNK_PAIRS", 4)  # several chunks, a short last one
    pairs = PreferenceSet(
        prompts=("p",) * num_pairs,
        prompt_ids=((1,),) * num_pairs,
        chosen_ids=tuple((i,) for i in range(num_pairs)),
        rejected_ids=((99,),) * num_pairs,
        pad_id=0,
    )
    seen: list[int] = []
    group = [_Rank(seen) for _ in range(ranks)]
    out = dpo.set_logps(_Actors(1.0, 1.0), group, pairs, "eval")
    assert out.chosen.tolist() == [float(i) for i in range(num_pairs)]
    assert out.rejected.tolist() == [-float(i) for i in range(num_pairs)]
    chunks = [seen[k : k + ranks] for k in range(0, len(seen), ranks)]
    assert all(len(set(c)) == 1 for c in chunks)  # equal shards within each chunk


def test_synthetic_kto_rows_are_both_sides_of_the_pairs(tmp_path):
    train, held_out = _synthetic_inputs(tmp_path, "loss=kto")
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert len(rows) == 80 and sum(r["label"] for r in rows) == 40
    assert set(rows[0]) == {"prompt", "completion", "label"}
    assert len(held_out.read_text().splitlines()) == 200


class _Recorder(ActorSet):
    """Records the roles a recipe starts instead of starting them."""

    def __init__(self) -> None:
        super().__init__(1.0, 1.0)
        self.started: list[str] = []

    def start_zero3(self, role, cls, group, grad_accum_steps, seed):
        self.started.append(role)
        return ["rank"] * group.num_ranks

    def start_one(self, role, cls, res, *args):
        self.started.append(role)

    def wait_ready(self) -> None:
        pass


@pytest.mark.parametrize("loss", ["dpo", "ipo", "cdpo", "kto", "orpo", "simpo"])
def test_reference_free_losses_start_no_reference_actor(loss):
    actors = _Recorder()
    assert dpo.start_actors(load_dpo_config(None, [f"loss={loss}"]), actors) == ["rank"] * 2
    free = loss in ("orpo", "simpo")
    assert actors.started == (["policy"] if free else ["policy", "reference"])


class _Reserved(Exception):
    pass


@pytest.mark.parametrize("loss, cpus", [("dpo", 3.0), ("orpo", 2.0), ("simpo", 2.0)])
def test_reference_free_losses_reserve_nothing_for_a_reference(
    monkeypatch, tokenizer_only, tmp_path, loss, cpus
):
    """The CPUs asked of Ray: 2 policy ranks, plus 1 for the reference if the loss uses one."""
    asked = []

    def start_ray(address, num_cpus):
        asked.append(num_cpus)
        raise _Reserved

    monkeypatch.setattr(dpo, "start_ray", start_ray)
    cfg = load_dpo_config(
        None,
        [
            f"policy.model_path={tokenizer_only}",
            "make_tiny_models=null",
            f"run_dir={tmp_path / 'run'}",
            "synthetic_pairs=32",
            f"loss={loss}",
        ],
    )
    with pytest.raises(_Reserved):
        dpo.train_dpo(cfg)
    assert asked == [cpus]


@pytest.mark.parametrize("loss", ["dpo", "cdpo", "kto", "orpo", "simpo"])
def test_a_runs_recorded_config_loads_again(tmp_path, loss):
    """config.yaml records every field, those of other losses included, at their defaults."""
    from rayrlhf.runtime.run_dir import write_run_config

    recipe = RECIPES / f"{'dpo' if loss == 'cdpo' else loss}-tiny-cpu.yaml"
    cfg = load_dpo_config(recipe, [f"loss={loss}"])
    again = load_dpo_config(write_run_config(cfg, tmp_path) / "config.yaml")
    assert again == cfg
