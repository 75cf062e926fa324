"""DPO driver: its config (validated before Ray starts) and its input preparation."""

import pytest

from rayrlhf.cluster.actors import ActorSet
from rayrlhf.config import ConfigError
from rayrlhf.data.preferences import PreferenceSet
from rayrlhf.recipes import dpo
from rayrlhf.recipes.dpo import load_dpo_config, prepare_inputs

BASE = ["policy.model_path=models/tiny/policy", "synthetic_pairs=64"]


def test_embedded_recipe_is_valid():
    cfg = load_dpo_config()
    assert cfg.synthetic_pairs and cfg.make_tiny_models
    assert cfg.batch_size % (cfg.policy.micro_batch_size * cfg.policy.num_ranks) == 0


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (["batch_size=30"], "batch_size=30 must be divisible by policy.micro_batch_size"),
        (["loss_type=ipo", "label_smoothing=0.1"], "label_smoothing (cDPO)"),
        (["data.train=pairs.jsonl"], "set synthetic_pairs or data.train/data.eval, not both"),
        (["synthetic_pairs=null"], "set data.train"),
        (["loss_type=hinge"], "loss_type: Input should be 'sigmoid' or 'ipo'"),
        (["label_smoothing=0.5"], "label_smoothing: Input should be less than 0.5"),
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
    cfg = load_dpo_config(
        None,
        [
            f"policy.model_path={tmp_path / 'policy'}",
            "make_tiny_models=null",
            "synthetic_pairs=null",
            f"data.train={tmp_path / 'nope.jsonl'}",
        ],
    )
    with pytest.raises(ConfigError, match="data.train: path does not exist"):
        prepare_inputs(cfg)


def test_synthetic_pairs_are_written_into_the_run_dir(tmp_path):
    (tmp_path / "policy").mkdir()
    cfg = load_dpo_config(
        None,
        [
            f"policy.model_path={tmp_path / 'policy'}",
            "make_tiny_models=null",
            "synthetic_pairs=40",
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    train, held_out = prepare_inputs(cfg)
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
