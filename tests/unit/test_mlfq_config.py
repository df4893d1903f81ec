"""``mlfq_preempt_wait_iters`` is plumbed from every front end to the engine's scheduler (#15).

EngineConfig, the worker flag, ``pdserve serve`` and the Ray pool key each carry it; a negative value
is refused naming the setting, and the worker/serve flag is refused without ``--scheduling-policy mlfq``.
"""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.scheduler import SchedulingPolicy
from pdserve.worker_base import Role
from pdserve.worker_main import parse
from tests.serve_args import serve_worker_args

BASE = ["--worker-id", "d0", "--model", "/m", "--store", "127.0.0.1:1", "--tls", "off"]


def test_engine_config_default_matches_the_scheduler_default() -> None:
    from engine.scheduler import SchedulerConfig

    assert EngineConfig().mlfq_preempt_wait_iters == SchedulerConfig().mlfq_preempt_wait_iters == 8
    assert EngineConfig(mlfq_preempt_wait_iters=0).mlfq_preempt_wait_iters == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_engine_config_refuses_a_bad_wait_naming_the_field(bad) -> None:
    with pytest.raises(ValueError, match="mlfq_preempt_wait_iters"):
        EngineConfig(mlfq_preempt_wait_iters=bad)


def test_the_engine_passes_it_to_its_scheduler(tiny_models) -> None:
    from engine.llm_engine import LLMEngine

    cfg = EngineConfig(num_kv_blocks=16, scheduling_policy=SchedulingPolicy.MLFQ, mlfq_preempt_wait_iters=5)
    eng = LLMEngine.from_pretrained(tiny_models["llama"], cfg)
    assert eng.scheduler.config.mlfq_preempt_wait_iters == 5


def test_worker_flag_reaches_the_engine_config() -> None:
    eng = parse([*BASE, "--scheduling-policy", "mlfq", "--mlfq-preempt-wait-iters", "3"], Role.DECODE).engine
    assert eng.mlfq_preempt_wait_iters == 3 and eng.scheduling_policy is SchedulingPolicy.MLFQ
    assert parse(BASE, Role.DECODE).engine.mlfq_preempt_wait_iters == 8


@pytest.mark.parametrize(
    "argv, why",
    [
        (
            ["--scheduling-policy", "mlfq", "--mlfq-preempt-wait-iters", "-1"],
            "--mlfq-preempt-wait-iters must be >= 0",
        ),
        (["--mlfq-preempt-wait-iters", "2"], "--mlfq-preempt-wait-iters needs --scheduling-policy mlfq"),
    ],
)
def test_worker_flag_refused(argv, why, capsys) -> None:
    with pytest.raises(SystemExit):
        parse([*BASE, *argv], Role.DECODE)
    assert why in capsys.readouterr().err


def test_serve_forwards_the_flag_to_the_workers(monkeypatch) -> None:
    rc, args = serve_worker_args(
        monkeypatch, ["--scheduling-policy", "mlfq", "--mlfq-preempt-wait-iters", "0"]
    )
    assert args == ("--scheduling-policy", "mlfq", "--mlfq-preempt-wait-iters", "0")
    assert parse([*BASE, *args], Role.DECODE).engine.mlfq_preempt_wait_iters == 0


@pytest.mark.parametrize(
    "argv, why",
    [
        (
            ["--scheduling-policy", "mlfq", "--mlfq-preempt-wait-iters", "-2"],
            "--mlfq-preempt-wait-iters must be >= 0",
        ),
        (["--mlfq-preempt-wait-iters", "2"], "needs --scheduling-policy mlfq"),
    ],
)
def test_serve_refuses_a_bad_flag_before_launching(monkeypatch, capsys, argv, why) -> None:
    rc, args = serve_worker_args(monkeypatch, argv)
    assert rc == 2 and args is None
    assert why in capsys.readouterr().err


def test_ray_pool_key_reaches_the_engine_config() -> None:
    from pdserve.cluster_config import from_dict

    c = from_dict({"model": "/m", "decode": {"scheduling_policy": "mlfq", "mlfq_preempt_wait_iters": 2}})
    assert c.decode.engine_config().mlfq_preempt_wait_iters == 2
    assert c.prefill.engine_config().mlfq_preempt_wait_iters == 8


@pytest.mark.parametrize("bad, why", [(-1, "must be >= 0"), (1.5, "")])
def test_ray_pool_key_refused_naming_it(bad, why) -> None:
    from pdserve.cluster_config import from_dict
    from pdserve.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=rf"decode.mlfq_preempt_wait_iters.*{why}"):
        from_dict({"model": "/m", "decode": {"mlfq_preempt_wait_iters": bad}})


# ------------------------------------------------------------ every other mlfq_* knob (#15)
# (flag value, EngineConfig value) per knob, none of them the default
OTHER_KNOBS = {
    "mlfq_num_levels": ("6", 6),
    "mlfq_quantum_iters": ("3", 3),
    "mlfq_base_prefill_s": ("0.02", 0.02),
    "mlfq_starvation_s": ("inf", float("inf")),
    "mlfq_swap_watermark": ("0.9", 0.9),
    "mlfq_swap_backoff_iters": ("0", 0),
    "mlfq_swap_backoff_max_iters": ("1024", 1024),
}
BAD_KNOBS = [
    ("--mlfq-num-levels", "0", "must be >= 1, got 0"),
    ("--mlfq-quantum-iters", "-1", "must be >= 1, got -1"),
    ("--mlfq-base-prefill-s", "0", "must be > 0, got 0.0"),
    ("--mlfq-base-prefill-s", "inf", "must be a finite number"),
    ("--mlfq-starvation-s", "-2", "must be > 0, got -2.0"),
    ("--mlfq-starvation-s", "nan", "must be a finite number"),
    ("--mlfq-swap-watermark", "1.5", "must be in (0, 1], got 1.5"),
    ("--mlfq-swap-watermark", "0", "must be in (0, 1], got 0.0"),
    ("--mlfq-swap-backoff-iters", "-1", "must be >= 0, got -1"),
    ("--mlfq-swap-backoff-max-iters", "-3", "must be >= 0, got -3"),
]


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def test_every_engine_mlfq_field_is_a_knob_with_the_engine_default() -> None:
    from dataclasses import fields

    from engine.scheduler import SchedulerConfig
    from pdserve.cluster_config import PoolConfig
    from pdserve.mlfq_knobs import KNOBS

    engine_fields = {f.name for f in fields(EngineConfig) if f.name.startswith("mlfq_")}
    assert {k.field for k in KNOBS} == engine_fields == set(OTHER_KNOBS) | {"mlfq_preempt_wait_iters"}
    for k in KNOBS:  # one default everywhere: engine, scheduler, Ray pool
        assert k.default == getattr(EngineConfig(), k.field) == getattr(SchedulerConfig(), k.field)
        assert getattr(PoolConfig(), k.field) == k.default


def test_every_worker_flag_reaches_the_engine_config_and_the_scheduler(tiny_models) -> None:
    from engine.llm_engine import LLMEngine

    argv = [x for f, (v, _) in OTHER_KNOBS.items() for x in (flag(f), v)]
    eng = parse([*BASE, "--scheduling-policy", "mlfq", *argv], Role.DECODE).engine
    for f, (_, want) in OTHER_KNOBS.items():
        assert getattr(eng, f) == want, f
    defaults = parse(BASE, Role.DECODE).engine
    for f in OTHER_KNOBS:
        assert getattr(defaults, f) == getattr(EngineConfig(), f), f
    cfg = EngineConfig(num_kv_blocks=16, scheduling_policy=SchedulingPolicy.MLFQ, mlfq_num_levels=6)
    sched = LLMEngine.from_pretrained(tiny_models["llama"], cfg).scheduler.config
    assert sched.mlfq_num_levels == 6


@pytest.mark.parametrize(("name", "value", "why"), BAD_KNOBS)
def test_every_worker_flag_out_of_range_is_refused_naming_it(name, value, why, capsys) -> None:
    with pytest.raises(SystemExit):
        parse([*BASE, "--scheduling-policy", "mlfq", name, value], Role.DECODE)
    assert f"{name} {why}" in capsys.readouterr().err


@pytest.mark.parametrize("field", sorted(OTHER_KNOBS))
@pytest.mark.parametrize("policy", [[], ["--scheduling-policy", "fcfs"]])
def test_every_worker_flag_needs_mlfq(field, policy, capsys) -> None:
    with pytest.raises(SystemExit):
        parse([*BASE, *policy, flag(field), OTHER_KNOBS[field][0]], Role.DECODE)
    assert f"{flag(field)} needs --scheduling-policy mlfq" in capsys.readouterr().err


def test_serve_forwards_every_knob_to_the_workers(monkeypatch) -> None:
    argv = [x for f, (v, _) in OTHER_KNOBS.items() for x in (flag(f), v)]
    rc, args = serve_worker_args(monkeypatch, ["--scheduling-policy", "mlfq", *argv])
    assert args is not None and args[:2] == ("--scheduling-policy", "mlfq")
    eng = parse([*BASE, *args], Role.DECODE).engine
    for f, (_, want) in OTHER_KNOBS.items():
        assert getattr(eng, f) == want, f
    rc, args = serve_worker_args(monkeypatch, [])  # nothing given: nothing forwarded
    assert args is not None and not any(a.startswith("--mlfq") for a in args)


@pytest.mark.parametrize(
    ("name", "value", "why"), [*BAD_KNOBS, ("--mlfq-num-levels", "5", "needs --scheduling-policy mlfq")]
)
def test_serve_refuses_every_bad_knob_before_launching(monkeypatch, capsys, name, value, why) -> None:
    policy = [] if "needs" in why else ["--scheduling-policy", "mlfq"]
    rc, args = serve_worker_args(monkeypatch, [*policy, name, value])
    assert rc == 2 and args is None
    assert f"{name} {why}" in capsys.readouterr().err


def test_every_ray_pool_key_reaches_the_engine_config() -> None:
    from pdserve.cluster_config import from_dict

    keys = {f: want for f, (_, want) in OTHER_KNOBS.items() if f != "mlfq_starvation_s"}
    c = from_dict({"model": "/m", "decode": {"scheduling_policy": "mlfq", **keys}})
    e = c.decode.engine_config()
    for f, want in keys.items():
        assert getattr(e, f) == want, f
        assert getattr(c.prefill.engine_config(), f) == getattr(EngineConfig(), f)


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("mlfq_num_levels", 0, "must be >= 1"),
        ("mlfq_swap_watermark", 2.0, r"must be in \(0, 1\]"),
        ("mlfq_base_prefill_s", 0, "must be > 0"),
        ("mlfq_swap_backoff_iters", 1.5, "expected an integer"),
        ("mlfq_starvation_s", "x", "expected a number"),
    ],
)
def test_every_ray_pool_key_refused_naming_it(key, value, why) -> None:
    from pdserve.cluster_config import from_dict
    from pdserve.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=rf"decode.{key}.*{why}"):
        from_dict({"model": "/m", "decode": {"scheduling_policy": "mlfq", key: value}})


def test_a_ray_pool_key_set_without_mlfq_is_refused() -> None:
    from pdserve.cluster_config import from_dict
    from pdserve.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=r"decode.mlfq_quantum_iters.*scheduling_policy: mlfq"):
        from_dict({"model": "/m", "decode": {"mlfq_quantum_iters": 3}})
    # the engine's default value is harmless (what an unset key means)
    assert from_dict({"model": "/m", "decode": {"mlfq_quantum_iters": 8}}).decode.mlfq_quantum_iters == 8
