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
