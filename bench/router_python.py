"""Router Python per request: the CPU of the router's own code for one direct request, no gRPC (#12).

``bench/grpc_floor.py`` measures the bare grpc.aio calls and messages of a direct request; this
measures the rest: the router's servicer (:class:`router.service.GenerateServicer`, the real one:
edge admission, tokenizer-free validation, goodput placement, the lifecycle driver, the direct
legs, the ticket, the metrics, the log lines, the policy's feedback) serving requests in one
process against in-process fake workers, so that no gRPC call, no other process and no network
is counted. The fake prefill worker answers at once with a first token and a KV handle; the fake
decode worker sends the admission message (no tokens) and then the finish with the other
``max_tokens - 1`` tokens, as a decode worker streaming directly to its client does for a short
request. The client context takes every response at once.

Each round drives ``--requests`` requests over ``--concurrency`` concurrent tasks on one event
loop and reports this process's CPU microseconds per request (``time.process_time``; the fakes
and the driving loop are about 4% of it under cProfile). The process's garbage collector is settled as the
router's (:func:`pdserve.gc_tuning.settle_heap`; ``settle=False`` leaves it alone), and the
router's log lines are formatted as its own (JSON) and then dropped. Every response is checked:
three per request (first token, redirect, finish), the finish counting ``max_tokens`` tokens.

Usage: python bench/router_python.py [--requests 2000] [--concurrency 64] [--rounds 5]
       [--max-tokens 32] [--profile FILE]  (the profiled round, the last, runs with the cyclic
       garbage collector off, so that its pauses are not charged to the function that allocated)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = list(range(10, 18))  # 8 prompt tokens, as bench/serving_efficiency.py's default


class _Unary:
    """A unary call as a ``grpc.aio`` stub returns it: awaitable, cancellable."""

    def __init__(self, value: object) -> None:
        self._value = value

    def __await__(self):
        return self._get().__await__()

    async def _get(self) -> object:
        return self._value

    def cancel(self) -> bool:
        return False


class _Stream:
    """A server-streaming call as a ``grpc.aio`` stub returns it: async-iterable, cancellable."""

    def __init__(self, messages: list) -> None:
        self._messages = messages

    async def __aiter__(self) -> AsyncIterator[object]:
        for m in self._messages:
            yield m

    def cancel(self) -> bool:
        return True


class _Worker:
    """The fake prefill and decode worker (one stub object serves both calls)."""

    def Prefill(self, req, timeout=None, metadata=None) -> _Unary:  # noqa: N802 - the stub's name
        from pdserve.v1 import common_pb2, worker_pb2

        kv = common_pb2.KVHandle(
            request_id=req.request_id,
            block_hashes=[b"h" * 16],
            locations=[common_pb2.BlockLocation(node_id="kv0", address="store:1")],
            num_tokens=len(req.prompt_token_ids),
        )
        return _Unary(worker_pb2.PrefillResponse(request_id=req.request_id, first_token=100, kv=kv))

    def Decode(self, req, timeout=None, metadata=None) -> _Stream:  # noqa: N802 - the stub's name
        from pdserve.v1 import common_pb2, worker_pb2

        if not req.HasField("direct"):
            raise RuntimeError("bench/router_python.py: the router did not grant a direct stream")
        n = req.sampling.max_tokens - 1
        finish = worker_pb2.DecodeResponse(
            request_id=req.request_id,
            token_ids=[101 + i for i in range(n)],
            token_offsets_s=[0.001 * i for i in range(n)],
        )
        finish.finish.reason = common_pb2.FINISH_REASON_LENGTH
        return _Stream([worker_pb2.DecodeResponse(request_id=req.request_id), finish])


class _Stubs:
    def __init__(self) -> None:
        self._worker = _Worker()

    def worker(self, address: str) -> _Worker:
        return self._worker


class _Context:
    """The part of ``grpc.aio.ServicerContext`` Generate uses: takes every response at once."""

    def __init__(self) -> None:
        self.written: list = []

    def cancelled(self) -> bool:
        return False

    def invocation_metadata(self) -> tuple:
        return ()

    def time_remaining(self) -> None:
        return None

    async def write(self, msg) -> None:
        self.written.append(msg)


def make_servicer(model_path: str):
    """A real :class:`GenerateServicer` (goodput placement, direct streams on, remote prefill
    only) over one fake prefill and one fake decode worker."""
    from prometheus_client import CollectorRegistry

    from pdserve.metrics import RouterMetrics
    from router.policy import GoodputConfig, PolicyKind
    from router.registry import Registry, WorkerKind, WorkerLoad
    from router.service import GenerateServicer, RouterConfig

    reg = Registry(heartbeat_timeout_s=1e9)
    reg.register("p0", WorkerKind.PREFILL, "p0", "m", WorkerLoad(0, 0, 100_000, 0, block_size=16))
    reg.register("d0", WorkerKind.DECODE, "d0", "m", WorkerLoad(0, 0, 100_000, 0, block_size=16))
    cfg = RouterConfig(
        model_path=model_path,
        model_id="m",
        policy=PolicyKind.GOODPUT,
        goodput=GoodputConfig(local_prefill=False),
        direct_streams=True,
    )
    svc = GenerateServicer(reg, cfg, RouterMetrics(CollectorRegistry()))
    svc.stubs = _Stubs()  # type: ignore[assignment]
    return svc


async def drive(svc, requests: int, concurrency: int, max_tokens: int, offset: int = 0) -> None:
    """``requests`` direct requests over ``concurrency`` tasks; every response checked."""
    from pdserve.v1 import client_pb2, common_pb2

    ids = iter(range(offset, offset + requests))

    async def worker() -> None:
        for i in ids:
            req = client_pb2.GenerateRequest(
                request_id=f"r{i}",
                prompt_token_ids=client_pb2.TokenIds(ids=PROMPT),
                sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                direct_stream=True,
            )
            ctx = _Context()
            await svc.Generate(req, ctx)
            out = ctx.written
            if not (
                len(out) == 3
                and out[1].HasField("direct")
                and out[2].HasField("finish")
                and out[2].finish.usage.completion_tokens == max_tokens
            ):
                raise RuntimeError(f"bench/router_python.py: request r{i} got {out!r}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def measure(
    requests: int, concurrency: int, rounds: int, max_tokens: int, profile: str = "", settle: bool = True
) -> list[float]:
    """CPU microseconds per request of each round (after a warm-up round); ``profile``: write
    the last round's cProfile stats there; ``settle``: settle the process's garbage collector
    as the router does (off in tests: it changes the whole process's collector)."""
    from pdserve.tracing import JsonFormatter

    # the router's log lines formatted as its own (JSON), then dropped: formatting counts, I/O not
    handler = logging.StreamHandler(_NullSink())
    handler.setFormatter(JsonFormatter("router"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        return _measure(requests, concurrency, rounds, max_tokens, profile, settle)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


class _NullSink(io.TextIOBase):
    """A text stream that takes every write and keeps nothing."""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        return len(s)


def _measure(
    requests: int, concurrency: int, rounds: int, max_tokens: int, profile: str, settle: bool
) -> list[float]:
    from bench.cluster_load import tiny_model
    from pdserve.gc_tuning import settle_heap

    with tempfile.TemporaryDirectory() as tmp:
        svc = make_servicer(str(tiny_model(Path(tmp))))
        if settle:
            settle_heap()
        asyncio.run(drive(svc, min(requests, 256), concurrency, max_tokens, offset=10**7))
        out = []
        for r in range(rounds):
            prof = cProfile.Profile() if profile and r == rounds - 1 else None
            t0 = time.process_time()
            if prof is not None:  # the collector off: its pauses are not charged to whoever allocated
                gc.disable()
                prof.enable()
            asyncio.run(drive(svc, requests, concurrency, max_tokens, offset=r * requests))
            if prof is not None:
                prof.disable()
                gc.enable()
                prof.dump_stats(profile)
            out.append((time.process_time() - t0) / requests * 1e6)
        return out


def build_parser() -> argparse.ArgumentParser:
    from pdserve import cli_help

    ap = argparse.ArgumentParser(prog="python bench/router_python.py", description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per round")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent requests")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (after one warm-up)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request")
    ap.add_argument("--profile", default="", help="write the last round's cProfile stats to this file")
    return cli_help.apply(ap)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.requests < 1 or a.concurrency < 1 or a.rounds < 1 or a.max_tokens < 2:
        raise SystemExit("--requests, --concurrency, --rounds must be >= 1 and --max-tokens >= 2")
    per = measure(a.requests, a.concurrency, a.rounds, a.max_tokens, a.profile)
    med = statistics.median(per)
    print(
        f"router Python per direct request ({a.requests} requests x {a.rounds} rounds, concurrency "
        f"{a.concurrency}, {a.max_tokens} tokens, load {' / '.join(f'{x:.1f}' for x in os.getloadavg())}): "
        f"{' '.join(f'{x:.0f}' for x in per)} us CPU; median {med:.0f} us = "
        f"{med / 1000 / a.max_tokens:.4f} ms/token"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
