"""``pdserve scale`` on a cluster serving several base models (#16 part 3), the pure parts: which
model's pools a scale resizes (pdserve.ray_cluster.scale_target: required on a several-model
cluster, an unknown model refused naming the served ones), the whole-cluster config its capacity
check sees (with_model_counts), and the command line's --model. The Ray path is in
tests/integration/test_ray_multi_model.py."""

from __future__ import annotations

import argparse

import pytest

from pdserve.cluster_config import PoolRole, from_dict
from pdserve.errors import InvalidRequestError
from pdserve.ray_cluster import plan_scale, scale_target, with_model_counts

TWO = from_dict(
    {
        "models": [
            {"model": "/m/A", "prefill": {"count": 1}, "decode": {"count": 2}},
            {"model": "/m/B", "prefill": {"count": 1}, "decode": {"count": 1, "num_cpus": 2}},
        ]
    }
)
ONE = from_dict({"model": "/m/A", "prefill": {"count": 1}, "decode": {"count": 1}})


def test_scale_target_names_one_model_of_several() -> None:
    b = scale_target(TWO, "B")
    assert (b.model, b.model_tag, b.decode.count, b.decode.num_cpus) == ("/m/B", "B", 1, 2)
    for missing in (None, ""):
        with pytest.raises(
            InvalidRequestError, match=r"several models \('A', 'B'\): name the one to scale with --model"
        ):
            scale_target(TWO, missing)
    with pytest.raises(InvalidRequestError, match="unknown model 'C': this cluster serves 'A', 'B'"):
        scale_target(TWO, "C")


def test_scale_target_of_one_model() -> None:
    assert scale_target(ONE, None) is ONE and scale_target(ONE, "A") is ONE
    with pytest.raises(InvalidRequestError, match="unknown model 'B': this cluster serves 'A'"):
        scale_target(ONE, "B")


def test_with_model_counts_resizes_only_the_named_models_pools() -> None:
    out = with_model_counts(TWO, scale_target(TWO, "B"), 3, None)
    a, b = out.models
    assert a == TWO.models[0]  # the other model untouched
    assert (b.prefill.count, b.decode.count, b.decode.num_cpus) == (3, 1, 2)
    assert out.model_ids == ["A", "B"] and out.several
    one = with_model_counts(ONE, ONE, None, 4)
    assert (one.prefill.count, one.decode.count) == (1, 4)


def test_plan_scale_on_one_models_worker_ids() -> None:
    """A model's workers are <role>-<model>-<n>: the newest (highest n) go first."""
    live = {PoolRole.DECODE: ["decode-B-0", "decode-B-2", "decode-B-1"], PoolRole.PREFILL: ["prefill-B-0"]}
    assert plan_scale(live, {PoolRole.PREFILL: None, PoolRole.DECODE: 1}) == (
        [],
        ["decode-B-2", "decode-B-1"],
    )
    assert plan_scale(live, {PoolRole.PREFILL: 2, PoolRole.DECODE: None}) == ([PoolRole.PREFILL], [])


def test_scale_command_line_takes_a_model() -> None:
    from pdserve import ray_cli

    ap = argparse.ArgumentParser()
    ray_cli.register(ap.add_subparsers(dest="cmd"))
    a = ap.parse_args(["scale", "--model", "B", "--decode", "3"])
    assert (a.model, a.decode, a.prefill) == ("B", 3, None)
    assert ap.parse_args(["scale", "--decode", "3"]).model is None
