"""Each algorithm choice's names live once, in rayrlhf.config; its registry must match them."""

import subprocess
import sys
from typing import get_args

import pytest
import torch

from rayrlhf.algorithms.estimators import ADVANTAGE_ESTIMATORS, get_estimator
from rayrlhf.algorithms.kl import KL_ESTIMATORS, kl_estimate
from rayrlhf.algorithms.losses import AGGREGATIONS, Aggregation
from rayrlhf.algorithms.registry import check_names, lookup
from rayrlhf.config import (
    CRITIC_ESTIMATORS,
    GROUP_ESTIMATORS,
    AdvantageName,
    AggregationMode,
    AlgorithmConfig,
    KLEstimatorName,
)

_X = torch.zeros(1, 2)

# (registry, its config Literal, how a caller resolves a name from it)
REGISTRIES = {
    "advantage": (ADVANTAGE_ESTIMATORS, AdvantageName, get_estimator),
    "kl": (KL_ESTIMATORS, KLEstimatorName, lambda name: kl_estimate(_X, _X, name)),
    "aggregation": (AGGREGATIONS, AggregationMode, Aggregation),
}


@pytest.mark.parametrize("choice", list(REGISTRIES))
def test_registry_keys_are_the_config_names_and_unknown_names_list_them(choice):
    registry, names, resolve = REGISTRIES[choice]
    assert tuple(registry) == get_args(names)
    with pytest.raises(ValueError) as err:
        resolve("bogus")
    assert "'bogus'" in str(err.value)
    assert f"valid names: {', '.join(get_args(names))}" in str(err.value)


def test_group_and_critic_estimators_are_advantage_names():
    assert set(GROUP_ESTIMATORS) | set(CRITIC_ESTIMATORS) <= set(get_args(AdvantageName))
    for name in get_args(AdvantageName):
        algo = AlgorithmConfig(advantage=name, n_samples_per_prompt=2)
        assert algo.needs_critic == (name in CRITIC_ESTIMATORS)
        if name in GROUP_ESTIMATORS:
            with pytest.raises(ValueError, match="compares samples of a prompt"):
                AlgorithmConfig(advantage=name, n_samples_per_prompt=1)
        else:
            AlgorithmConfig(advantage=name, n_samples_per_prompt=1)


def test_check_names_reports_both_sides_and_orders_as_declared():
    with pytest.raises(
        ValueError, match=r"thing registry .* missing \['b'\], not declared \['c'\]"
    ):
        check_names({"a": 1, "c": 3}, ("a", "b"), "thing")
    assert list(check_names({"b": 2, "a": 1}, ("a", "b"), "thing")) == ["a", "b"]
    with pytest.raises(ValueError, match="unknown thing 'z'; valid names: a, b"):
        lookup({"a": 1, "b": 2}, "z", "thing")


@pytest.mark.parametrize(
    ("alias", "module", "what"),
    [
        ("AdvantageName", "estimators", "advantage estimator"),
        ("KLEstimatorName", "kl", "KL estimator"),
        ("AggregationMode", "losses", "loss aggregation"),
    ],
)
def test_a_name_declared_without_an_implementation_fails_at_import(alias, module, what):
    # A fresh interpreter: add a name to the config's Literal, then import the registry.
    code = (
        "import typing, rayrlhf.config as c\n"
        f"c.{alias} = typing.Literal[(*typing.get_args(c.{alias}), 'added')]\n"
        f"import rayrlhf.algorithms.{module}\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"the {what} registry does not match" in out.stderr
    assert "missing ['added']" in out.stderr
