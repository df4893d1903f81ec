"""``python -m prefill_worker``: the common worker flags (:mod:`pdserve.worker_main`) plus the
fetch-or-recompute policy of store prefixes (:mod:`prefill_worker.prefix_policy`):

``--prefix-fetch {auto,always,never}``, ``--prefix-bandwidth`` (bytes/s seed),
``--prefix-call-latency-s`` (seed), ``--prefill-tokens-per-s`` (seed), ``--prefix-ewma-alpha``.
"""

from __future__ import annotations

import argparse
import sys

from pdserve.worker_base import Role
from pdserve.worker_main import main
from prefill_worker.prefix_policy import FetchMode, PrefixFetchConfig


def _parser() -> argparse.ArgumentParser:
    d = PrefixFetchConfig()
    ap = argparse.ArgumentParser(prog="python -m prefill_worker", add_help=False, usage=argparse.SUPPRESS)
    g = ap.add_argument_group("fetch-or-recompute of store prefixes (prefill_worker.prefix_policy)")
    g.add_argument(
        "--prefix-fetch",
        default=d.mode.value,
        choices=[m.value for m in FetchMode],
        help="fetch a cached prefix from the store: when cheaper than recomputing it (auto), always, never",
    )
    g.add_argument(
        "--prefix-bandwidth",
        type=float,
        default=d.bandwidth_bytes_per_s,
        help="auto: store read bandwidth estimate to start from, bytes/s",
    )
    g.add_argument(
        "--prefix-call-latency-s",
        type=float,
        default=d.call_latency_s,
        help="auto: fixed cost of one store fetch to start from, seconds",
    )
    g.add_argument(
        "--prefill-tokens-per-s",
        type=float,
        default=d.prefill_tokens_per_s,
        help="auto: prefill speed estimate to start from, tokens/s",
    )
    g.add_argument(
        "--prefix-ewma-alpha",
        type=float,
        default=d.alpha,
        help="auto: weight of each new measurement in the estimates (EWMA)",
    )
    return ap


def build_parser() -> argparse.ArgumentParser:
    """The whole ``python -m prefill_worker`` command line (what ``--help`` shows)."""
    from pdserve.worker_main import build_parser as worker_parser

    return worker_parser(Role.PREFILL, parents=[_parser()])


def parse_prefix_args(argv: list[str]) -> tuple[PrefixFetchConfig, list[str]]:
    """Split the prefix-policy flags off ``argv``: (their config, the remaining arguments)."""
    ap = _parser()
    a, rest = ap.parse_known_args(argv)
    try:
        cfg = PrefixFetchConfig(
            mode=FetchMode(a.prefix_fetch),
            bandwidth_bytes_per_s=a.prefix_bandwidth,
            call_latency_s=a.prefix_call_latency_s,
            prefill_tokens_per_s=a.prefill_tokens_per_s,
            alpha=a.prefix_ewma_alpha,
        )
    except ValueError as e:
        ap.error(str(e))
    return cfg, rest


if __name__ == "__main__":
    cfg, rest = parse_prefix_args(sys.argv[1:])
    sys.exit(main(Role.PREFILL, rest, prefix_fetch=cfg, parents=[_parser()]))
