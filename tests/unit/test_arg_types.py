"""Port flags are checked when the command line is parsed: `pdserve serve --openai-port 99999`
started the whole cluster and then died in socket.bind with an OverflowError traceback."""

from __future__ import annotations

import argparse

import pytest

from pdserve.arg_types import port_number, positive_seconds
from pdserve.cli import main


@pytest.mark.parametrize("text, port", [("0", 0), ("8000", 8000), ("65535", 65535)])
def test_port_number_accepts_ports(text, port) -> None:
    assert port_number(text) == port


@pytest.mark.parametrize("text", ["-1", "65536", "99999", "http", "80.5", ""])
def test_port_number_refuses_what_is_not_a_port(text) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="port"):
        port_number(text)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["serve", "--openai-port", "99999"], "--openai-port"),
        (["openai", "--port", "70000"], "--port"),
    ],
)
def test_a_bad_port_stops_the_command_before_it_starts_anything(argv, flag, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: a port is 0-65535" in err and "Traceback" not in err, err


@pytest.mark.parametrize("module", ["router.__main__", "kv_store.__main__"])
def test_process_port_flags_are_checked_too(module, capsys) -> None:
    import importlib

    ap = importlib.import_module(module).build_parser()
    with pytest.raises(SystemExit):
        ap.parse_args(["--port", "65536"])
    assert "argument --port: a port is 0-65535 (0: any free port), got 65536" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "soon"])
def test_positive_seconds_refuses_what_is_not_a_deadline(text) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        positive_seconds(text)


def test_generate_timeout_is_checked_when_parsed(capsys) -> None:
    """`pdserve generate PROMPT --timeout -1` answered 'Deadline Exceeded' from the router."""
    assert positive_seconds("2.5") == 2.5
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--timeout", "-1"])
    assert e.value.code == 2
    assert "argument --timeout: must be a finite number of seconds > 0, got -1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, flag, says",
    [
        # each ran before: --max-input 0 clipped every prompt to 1 token, --target 1.5 reported
        # "goodput (attainment >= 150%): 0.00", --ttft -1 made every request a miss
        (["--max-input", "0"], "--max-input", "must be >= 1"),
        (["--max-output", "-2"], "--max-output", "must be >= 1"),
        (["-n", "0"], "-n/--num-requests", "must be >= 1"),
        (["--length-scale", "x"], "--length-scale", "expected a whole number"),
        (["--target", "1.5"], "--target", "must be in (0, 1]"),
        (["--target", "0"], "--target", "must be in (0, 1]"),
        (["--ttft", "-1"], "--ttft", "seconds > 0"),
        (["--tpot", "0"], "--tpot", "seconds > 0"),
    ],
)
def test_bench_numbers_are_checked_when_parsed(argv, flag, says, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "--embedded", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and says in err and "Traceback" not in err, err


@pytest.mark.parametrize("rates", ["1,,2", "inf", "nan", "0", "-1", "fast", ""])
def test_bench_rates_refuse_empty_entries_and_non_finite_rates(rates) -> None:
    from pdserve.bench_cli import _rates

    with pytest.raises(SystemExit, match="--rates"):
        _rates(rates)
    assert _rates("0.5, 2") == [0.5, 2.0]


@pytest.mark.parametrize(
    "argv", [["serve", "--kv-blocks", "0"], ["generate", "hi", "--embedded", "--kv-blocks", "-1"]]
)
def test_kv_blocks_are_checked_when_parsed(argv, capsys) -> None:
    """`pdserve serve --kv-blocks 0` started the store and the router, then a worker died."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "argument --kv-blocks: must be >= 1" in capsys.readouterr().err


def test_worker_kv_blocks_are_checked_when_parsed(capsys) -> None:
    from pdserve.worker_base import Role
    from pdserve.worker_main import parse

    with pytest.raises(SystemExit):
        parse(["--model", "m", "--kv-blocks", "0"], Role.DECODE)
    assert "argument --kv-blocks: must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, says",
    [
        # started the store and router, then a worker died with "--swap-space must be >= 0 GiB"
        (["serve", "--swap-space", "-1"], "argument --swap-space: must be a finite number of GiB >= 0"),
        (["serve", "--swap-disk", "nan"], "argument --swap-disk: must be a finite number of GiB >= 0"),
        # served, and refused every chat completion without max_tokens (max_tokens 0)
        (["openai", "--chat-max-tokens", "0"], "argument --chat-max-tokens: must be >= 1"),
    ],
)
def test_serve_and_openai_sizes_are_checked_when_parsed(argv, says, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["up", "scale"])
def test_ray_pool_sizes_are_checked_when_parsed(cmd, capsys) -> None:
    """`pdserve scale --prefill -1` went to Ray first (and with a cluster, to the config's check)."""
    extra = ["--config", "c.yaml"] if cmd == "up" else []
    with pytest.raises(SystemExit) as e:
        main([cmd, *extra, "--prefill", "-1"])
    assert e.value.code == 2 and "argument --prefill: must be >= 0" in capsys.readouterr().err


def test_router_heartbeat_timeout_is_checked(capsys) -> None:
    """`python -m router --heartbeat-timeout-s -1` started a router that drops every worker as it
    registers (silent for longer than -1 s)."""
    import importlib

    from router.registry import Registry

    ap = importlib.import_module("router.__main__").build_parser()
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit):
            ap.parse_args(["--model", "m", "--heartbeat-timeout-s", bad])
        assert (
            "argument --heartbeat-timeout-s: must be a finite number of seconds > 0"
            in capsys.readouterr().err
        )
    with pytest.raises(ValueError, match="heartbeat_timeout_s must be > 0"):
        Registry(heartbeat_timeout_s=0)


@pytest.mark.parametrize(
    "extra, says",
    [
        # each was a ValueError traceback, or (lease TTLs of 0 or less) a node that started
        (["--capacity-blocks", "0"], "argument --capacity-blocks: must be >= 1"),
        (
            ["--default-lease-ttl-s", "0"],
            "argument --default-lease-ttl-s: must be a finite number of seconds > 0",
        ),
        (["--high-water", "2"], "argument --high-water: must be in (0, 1]"),
        (["--replication-factor", "0"], "argument --replication-factor: must be >= 1"),
        (["--dtype", "float7"], "error: KV layout: unsupported dtype 'float7'"),
    ],
)
def test_kv_store_flags_are_one_error_line(extra, says, capsys) -> None:
    from kv_store.__main__ import parse_config

    base = ["--node-id", "kv0", "--model-id", "m", "--num-layers", "2", "--num-kv-heads", "2"]
    base += ["--head-dim", "4", "--capacity-blocks", "64"]
    with pytest.raises(SystemExit) as e:
        parse_config([*base, *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--chunk", "-1"], "argument --chunk: must be >= 0"),
        (
            ["--admission-timeout-s", "-1"],
            "argument --admission-timeout-s: must be a finite number of seconds >= 0",
        ),
        (
            ["--admission-timeout-s", "nan"],
            "argument --admission-timeout-s: must be a finite number of seconds >= 0",
        ),
    ],
)
def test_worker_numbers_are_checked_when_parsed(extra, says, capsys) -> None:
    from pdserve.worker_base import Role
    from pdserve.worker_main import parse

    with pytest.raises(SystemExit):
        parse(["--model", "m", *extra], Role.DECODE)
    assert says in capsys.readouterr().err
    ok = [
        "--worker-id",
        "w",
        "--model",
        "m",
        "--store",
        "127.0.0.1:1",
        "--chunk",
        "0",
        "--admission-timeout-s",
        "0",
    ]
    cfg = parse(ok, Role.DECODE)  # 0 is meaningful for both: the budget bounds chunks; never wait
    assert cfg.engine.long_prefill_token_threshold == 0 and cfg.admission_timeout_s == 0


def test_engine_config_refuses_a_negative_prefill_chunk() -> None:
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match="long_prefill_token_threshold .* must be >= 0"):
        EngineConfig(long_prefill_token_threshold=-1)
    assert EngineConfig(long_prefill_token_threshold=0).long_prefill_token_threshold == 0
