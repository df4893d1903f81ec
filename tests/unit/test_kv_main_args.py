"""``python -m kv_store`` options that configure the distributed pool (index, watermarks,
re-registration period, replication)."""

from __future__ import annotations

import pytest

from kv_store.__main__ import _extra_args, parse_config
from kv_store.index import InMemoryIndex
from kv_store.redis_index import RedisIndex, make_index

BASE = [
    "--node-id", "kv0", "--capacity-blocks", "64", "--model-id", "m", "--num-layers", "2",
    "--num-kv-heads", "2", "--head-dim", "4",
]  # fmt: skip


def test_defaults_are_the_embedded_single_node() -> None:
    cfg = parse_config(BASE)
    assert (cfg.high_water, cfg.low_water, cfg.replication_factor) == (1.0, 1.0, 1)
    assert cfg.index_sync_interval_s == 1.0
    assert _extra_args(BASE).index == "memory"
    assert isinstance(make_index(_extra_args(BASE).index), InMemoryIndex)


def test_cluster_options() -> None:
    url = "redis://127.0.0.1:6390/0?prefix=c1:"
    argv = [
        *BASE, "--index", url, "--high-water", "0.9", "--low-water", "0.7",
        "--index-sync-interval-s", "0.2", "--replication-factor", "2", "--metrics-port", "9100",
    ]  # fmt: skip
    cfg = parse_config(argv)
    assert (cfg.high_water, cfg.low_water, cfg.index_sync_interval_s, cfg.replication_factor) == (
        0.9,
        0.7,
        0.2,
        2,
    )
    extra = _extra_args(argv)
    assert (extra.index, extra.metrics_port) == (url, 9100)
    idx = make_index(extra.index)  # no connection is made until first use
    assert isinstance(idx, RedisIndex) and idx.prefix == "c1:"
    idx.close()


@pytest.mark.parametrize(
    ("flag", "value", "match"),
    [
        ("--replication-factor", "0", "argument --replication-factor: must be >= 1"),
        ("--low-water", "0.95", "need 0 < low_water <= high_water <= 1"),
    ],
)
def test_bad_values_are_refused(flag: str, value: str, match: str, capsys) -> None:
    """Refused as one usage error line (they were ValueError tracebacks)."""
    argv = [*BASE, "--high-water", "0.9", flag, value]
    with pytest.raises(SystemExit):
        parse_config(argv)
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        (
            ["--replication-factor", "2"],
            "--replication-factor 2 finds the other store nodes through a shared index",
        ),
        (["--index-sync-interval-s", "0.2"], "--index-sync-interval-s probes a Redis index"),
    ],
)
def test_shared_index_flags_need_a_redis_index(flags: list[str], why: str, capsys) -> None:
    """With the memory index (private to this node) replication found no other node and the
    re-registration probe never ran: both were accepted and dropped; now refused by name."""
    for index in ([], ["--index", "memory"]):
        with pytest.raises(SystemExit):
            parse_config([*BASE, *index, *flags])
        assert why in capsys.readouterr().err
    parse_config([*BASE, "--index", "redis://127.0.0.1:6390/0", *flags])  # no connection made
