"""Relay ceiling: tokens/s the router relays to its clients vs tokens/s its decode workers
produce, in the same run (#12; target >= 0.95).

One embedded cluster (router + 1 prefill + ``--decode`` decode workers + the KV store, tiny Llama
of :mod:`tests.tiny_models`, processes on 127.0.0.1). ``--streams`` concurrent SDK streams
(:class:`pdserve.client.AsyncClient`, closed loop) run ``--requests`` requests of ``--max-tokens``
tokens through the router. Meanwhile every decode worker's ``Stats.decode_tokens_total`` (tokens
its engine produced) is polled every ``--poll-s``, and the client records when each message's
tokens arrive.

* produced: the decode workers' tokens over the span in which their counters rose (first rise to
  last rise), in tokens/s;
* relayed: the same tokens as the clients received them (every token but each request's first,
  which the prefill worker produced), over the span from the first to the last of them.

A decode worker never waits for its reader (outputs queue up to ``max_tokens`` per stream), so a
router that relays slower than its workers produce finishes after them: relayed/produced < 1.
The machine's load average is printed beside the figures; progress (requests done) on stderr.

Usage: python bench/relay_ceiling.py [--streams 64] [--requests 256] [--max-tokens 128]
       [--decode 1] [--stream-interval 1] [--stream-window-ms MS] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from bench.cluster_load import Poller, Progress, load_avg, sdk_closed_loop, tiny_model  # noqa: E402
from pdserve.limits import grpc_options  # noqa: E402
from pdserve.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402

TARGET = 0.95


@dataclass
class CeilingResult:
    streams: int
    requests: int
    max_tokens: int
    decode_workers: int
    produced_tokens: int
    produced_span_s: float
    relayed_tokens: int
    relayed_span_s: float
    failures: dict[str, int]
    load_before: str
    load_after: str

    @property
    def produced_tps(self) -> float:
        return self.produced_tokens / self.produced_span_s if self.produced_span_s > 0 else 0.0

    @property
    def relayed_tps(self) -> float:
        return self.relayed_tokens / self.relayed_span_s if self.relayed_span_s > 0 else 0.0

    @property
    def ratio(self) -> float:
        return self.relayed_tps / self.produced_tps if self.produced_tps > 0 else 0.0


def decode_counter(addresses: list[str]):
    """A sampler of the decode workers' summed ``decode_tokens_total`` (their Stats RPC)."""
    stubs = [worker_pb2_grpc.WorkerStub(grpc.insecure_channel(a, options=grpc_options())) for a in addresses]

    def sample() -> int:
        return sum(s.Stats(worker_pb2.StatsRequest(), timeout=5).decode_tokens_total for s in stubs)

    return sample


def rise_span(samples: list[tuple[float, object]]) -> tuple[int, float]:
    """(total rise, seconds from the sample before the first rise to the last rise) of a polled
    counter."""
    if len(samples) < 2:
        return 0, 0.0
    values = [int(v) for _, v in samples]  # type: ignore[call-overload]
    first = next((i for i in range(1, len(values)) if values[i] > values[i - 1]), None)
    last = next((i for i in range(len(values) - 1, 0, -1) if values[i] > values[i - 1]), None)
    if first is None or last is None:
        return 0, 0.0
    return values[last] - values[first - 1], samples[last][0] - samples[first - 1][0]


def run(a: argparse.Namespace) -> CeilingResult:
    from pdserve.launcher import ClusterSpec, launch

    with tempfile.TemporaryDirectory() as tmp:
        model = str(tiny_model(Path(tmp)))
        spec = ClusterSpec(
            model_path=model,
            num_prefill=1,
            num_decode=a.decode,
            worker_kv_blocks=4096,
            worker_args=(
                "--stream-interval",
                str(a.stream_interval),
                "--stream-window-ms",
                f"{window_ms(a):g}",
            ),
        )
        with launch(spec) as cl:
            decode = [addr for wid, addr in cl.workers.items() if wid.startswith("decode")]
            asyncio.run(sdk_closed_loop(cl.router_address, 8, 8, 8, a.prompt_len, offset=10**6))  # warm-up
            before = load_avg()
            with Poller(decode_counter(decode), a.poll_s) as poll:
                r = asyncio.run(
                    sdk_closed_loop(
                        cl.router_address,
                        a.streams,
                        a.requests,
                        a.max_tokens,
                        a.prompt_len,
                        progress=Progress(f"{a.streams} streams", a.requests),
                        record_arrivals=True,
                    )
                )
            after = load_avg()
    produced, p_span = rise_span(poll.samples)
    # every request's first message carries its first token (the prefill worker's): the decode
    # workers' tokens are the rest; their span runs from the first to the last such arrival
    decode_arrivals = _decode_arrivals(r.arrivals)
    relayed = sum(n for _, n in decode_arrivals)
    r_span = decode_arrivals[-1][0] - decode_arrivals[0][0] if len(decode_arrivals) > 1 else 0.0
    return CeilingResult(
        a.streams,
        a.requests,
        a.max_tokens,
        a.decode,
        produced,
        p_span,
        relayed,
        r_span,
        r.failures,
        before,
        after,
    )


def _decode_arrivals(arrivals: list[tuple[float, int, bool]]) -> list[tuple[float, int]]:
    """``(time, tokens)`` of the decode workers' tokens as the clients received them, in time
    order: a request's first message carries its first token (the prefill worker's, alone: the
    router relays it before the decode stream starts), so one token is taken off each first
    message."""
    out = [(t, n - 1 if first else n) for t, n, first in arrivals]
    return sorted((t, n) for t, n in out if n > 0)


def window_ms(a: argparse.Namespace) -> float:
    """The decode workers' coalescing window of this run (ms): ``--stream-window-ms`` or the
    workers' default."""
    from pdserve.worker_base import DEFAULT_STREAM_WINDOW_S

    return DEFAULT_STREAM_WINDOW_S * 1000.0 if a.stream_window_ms is None else a.stream_window_ms


def build_parser() -> argparse.ArgumentParser:
    from pdserve import cli_help

    ap = argparse.ArgumentParser(prog="python bench/relay_ceiling.py", description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=64, help="concurrent client streams")
    ap.add_argument("--requests", type=int, default=256, help="requests in all (closed loop)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--prompt-len", type=int, default=8, help="prompt tokens per request")
    ap.add_argument("--decode", type=int, default=1, help="decode workers")
    ap.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="the decode worker's --stream-interval (tokens per message after the first)",
    )
    ap.add_argument(
        "--stream-window-ms",
        type=float,
        default=None,
        help="the decode worker's --stream-window-ms (adaptive coalescing; default: the worker's default)",
    )
    ap.add_argument("--poll-s", type=float, default=0.05, help="Stats polling interval of the decode workers")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    return cli_help.apply(ap)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    r = run(a)
    verdict = "PASS" if r.ratio >= TARGET else "FAIL"
    print(
        f"tiny Llama, {r.streams} streams, {r.requests} requests of {r.max_tokens} tokens, "
        f"1 prefill + {r.decode_workers} decode, --stream-interval {a.stream_interval} "
        f"--stream-window-ms {window_ms(a):g}"
    )
    print(
        f"  decode workers produced: {r.produced_tps:9.0f} tokens/s  ({r.produced_tokens} tokens in "
        f"{r.produced_span_s:.2f} s)"
    )
    print(
        f"  router relayed:          {r.relayed_tps:9.0f} tokens/s  ({r.relayed_tokens} tokens in "
        f"{r.relayed_span_s:.2f} s)"
    )
    print(
        f"  relayed/produced: {r.ratio:.3f}  (target >= {TARGET}: {verdict})  [{r.load_before} -> {r.load_after}]"
    )
    if r.failures:
        print(f"  failures: {r.failures}")
    if r.relayed_tokens != r.produced_tokens:
        print(f"  note: relayed {r.relayed_tokens} tokens vs produced {r.produced_tokens} (polling edges)")
    if a.out:
        Path(a.out).write_text(
            json.dumps(
                {**asdict(r), "produced_tps": r.produced_tps, "relayed_tps": r.relayed_tps, "ratio": r.ratio},
                indent=2,
            )
        )
    return 0 if verdict == "PASS" and not r.failures else 1


if __name__ == "__main__":
    sys.exit(main())
