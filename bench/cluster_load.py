"""Shared pieces of the cluster load benchmarks (``bench/concurrency.py``,
``bench/serving_efficiency.py``, ``bench/relay_ceiling.py``): the tiny model, the per-stream
prompts and requests, concurrent Generate streams over raw gRPC or the SDK, process CPU time from
``/proc``, the embedded engine baseline, percentiles and a progress line on stderr.

Nothing here decides a verdict: each benchmark compares figures measured in its own run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from pdserve.limits import grpc_options  # noqa: E402
from pdserve.v1 import client_pb2, client_pb2_grpc, common_pb2  # noqa: E402

VOCAB = 320  # tests.tiny_models vocabulary
CHANNELS = 8  # client connections the raw-gRPC streams are spread over


# ------------------------------------------------------------------------------- workload
def prompt_ids(i: int, length: int) -> list[int]:
    """A distinct prompt of ``length`` token ids for stream ``i`` (no shared prefix between streams)."""
    return [3 + (i * 7 + j * 13) % (VOCAB - 3) for j in range(length)]


def request(i: int, max_tokens: int, prompt_len: int) -> client_pb2.GenerateRequest:
    """Greedy request ``i``: ``prompt_len`` prompt ids, exactly ``max_tokens`` output tokens."""
    return client_pb2.GenerateRequest(
        request_id=f"load-{i}-{time.monotonic_ns()}",
        prompt_token_ids=client_pb2.TokenIds(ids=prompt_ids(i, prompt_len)),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )


def tiny_model(root: Path) -> Path:
    """The tiny Llama of :mod:`tests.tiny_models` with the default model's tokenizer (the router
    tokenizes and detokenizes), built under ``root``."""
    from pdserve.model_setup import ensure_default_model
    from tests.tiny_models import make_tiny_models

    return make_tiny_models(root, tokenizer_from=ensure_default_model(progress=False))["llama"]


# ------------------------------------------------------------------------------- measuring
def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (``/proc/<pid>/stat`` fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds of named processes between :meth:`start` and :meth:`stop` (``/proc``)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self._t0: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    def start(self) -> CpuMeter:
        self._t0 = {k: process_cpu_s(p) for k, p in self.pids.items()}
        return self

    def stop(self) -> dict[str, float]:
        self.seconds = {k: process_cpu_s(p) - self._t0[k] for k, p in self.pids.items()}
        return self.seconds


def load_avg() -> str:
    """The machine's 1/5/15-minute load averages and core count, for printing beside a figure."""
    a, b, c = os.getloadavg()
    return f"load {a:.1f}/{b:.1f}/{c:.1f} on {os.cpu_count()} cores"


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


class Progress:
    """A progress line on stderr (``label: done/total``), redrawn at most every ``every_s``."""

    def __init__(self, label: str, total: int, every_s: float = 1.0) -> None:
        self.label, self.total, self.every_s = label, total, every_s
        self.done = 0
        self._t0 = self._last = time.monotonic()
        self._tty = sys.stderr.isatty()

    def add(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        line = f"  {self.label}: {self.done}/{self.total} ({now - self._t0:.0f} s)"
        if self._tty:
            sys.stderr.write("\r" + line + ("\n" if self.done >= self.total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


# ------------------------------------------------------------------------------- raw gRPC streams
@dataclass
class StreamOutcome:
    """One stream: its status code name ("OK" on success), tokens received, TTFT (s, or None)."""

    code: str
    tokens: int = 0
    ttft_s: float | None = None
    detail: str = ""


async def _one(
    stub, req: client_pb2.GenerateRequest, timeout_s: float, progress: Progress | None
) -> StreamOutcome:
    t0 = time.monotonic()
    out = StreamOutcome("OK")
    finished = False
    try:
        try:
            async for m in stub.Generate(req, timeout=timeout_s):
                if m.token_ids and out.ttft_s is None:
                    out.ttft_s = time.monotonic() - t0
                out.tokens += len(m.token_ids)
                finished = finished or m.HasField("finish")
        except grpc.aio.AioRpcError as e:
            return StreamOutcome(e.code().name, out.tokens, out.ttft_s, e.details() or "")
        if not finished:
            return StreamOutcome("NO_FINISH", out.tokens, out.ttft_s)
        return out
    finally:
        if progress is not None:
            progress.add()


async def run_streams_async(
    address: str,
    n: int,
    max_tokens: int,
    prompt_len: int = 8,
    timeout_s: float = 300.0,
    progress: Progress | None = None,
) -> list[StreamOutcome]:
    """Open ``n`` Generate streams at once (spread over :data:`CHANNELS` connections) and read each
    to its end; one outcome per stream, in order."""
    channels = [grpc.aio.insecure_channel(address, options=grpc_options()) for _ in range(CHANNELS)]
    try:
        stubs = [client_pb2_grpc.GenerateStub(c) for c in channels]
        return list(
            await asyncio.gather(
                *(
                    _one(stubs[i % CHANNELS], request(i, max_tokens, prompt_len), timeout_s, progress)
                    for i in range(n)
                )
            )
        )
    finally:
        for c in channels:
            await c.close()


def run_streams(
    address: str,
    n: int,
    max_tokens: int,
    prompt_len: int = 8,
    timeout_s: float = 300.0,
    progress: Progress | None = None,
) -> list[StreamOutcome]:
    """:func:`run_streams_async` on a fresh event loop (callable from synchronous code)."""
    return asyncio.run(run_streams_async(address, n, max_tokens, prompt_len, timeout_s, progress))


# ------------------------------------------------------------------------------- closed loop (SDK)
@dataclass(frozen=True)
class RequestTiming:
    """One request of a closed-loop run as its client saw it (monotonic seconds): when it was
    sent, when each message arrived with how many tokens, and when its call ended;
    ``router_ttft``: the TTFT its finish reports (the router's, from when the router took the
    request to its first token), None when it had no finish."""

    start: float
    messages: tuple[tuple[float, int], ...]
    end: float
    router_ttft: float | None = None


@dataclass
class LoadResult:
    """A closed-loop run: ``requests`` finished, ``tokens`` received, ``wall_s`` from the first
    request to the last token, failures by error name (empty when all succeeded) and, when
    asked for, ``(monotonic time, tokens, first message of its request)`` of every message
    received and each successful request's :class:`RequestTiming`."""

    requests: int
    tokens: int
    wall_s: float
    failures: dict[str, int]
    arrivals: list[tuple[float, int, bool]]
    timings: list[RequestTiming] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


async def sdk_closed_loop(
    address: str,
    concurrency: int,
    total_requests: int,
    max_tokens: int,
    prompt_len: int,
    *,
    progress: Progress | None = None,
    record_arrivals: bool = False,
    timeout_s: float = 600.0,
    offset: int = 0,
    direct: bool = False,
) -> LoadResult:
    """``concurrency`` streams through the SDK's :class:`pdserve.client.AsyncClient` (one client,
    as an application holds one), each starting its next request when its last one finished,
    until ``total_requests`` are done. Request ``i`` has prompt ``prompt_ids(offset + i)``.
    ``direct``: the client offers direct streams (decode workers stream to it; see
    :mod:`pdserve.client_direct`)."""
    from pdserve.client import AsyncClient

    next_i = 0
    tokens = 0
    failures: dict[str, int] = {}
    arrivals: list[tuple[float, int, bool]] = []
    timings: list[RequestTiming] = []
    async with AsyncClient(address, timeout=timeout_s, direct=direct) as client:

        async def worker() -> None:
            nonlocal next_i, tokens
            while next_i < total_requests:
                i = next_i
                next_i += 1
                first = True
                start = time.monotonic()
                seen: list[tuple[float, int]] = []
                router_ttft: float | None = None
                try:
                    async for c in client.generate(
                        prompt_ids(offset + i, prompt_len),
                        max_tokens=max_tokens,
                        temperature=0.0,
                        ignore_eos=True,
                    ):
                        tokens += len(c.token_ids)
                        if record_arrivals:
                            now = time.monotonic()
                            arrivals.append((now, len(c.token_ids), first))
                            seen.append((now, len(c.token_ids)))
                        first = False
                        if c.finish is not None:
                            router_ttft = c.finish.ttft_s
                    if record_arrivals:
                        timings.append(RequestTiming(start, tuple(seen), time.monotonic(), router_ttft))
                except Exception as e:  # noqa: BLE001 - counted, the run goes on
                    failures[type(e).__name__] = failures.get(type(e).__name__, 0) + 1
                if progress is not None:
                    progress.add()

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.monotonic() - t0
    return LoadResult(total_requests, tokens, wall, failures, arrivals, timings)


# ------------------------------------------------------------------------------- engine alone
@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` torch threads (a launched worker runs on 1: OMP_NUM_THREADS=1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_engine(model_path: str, kv_blocks: int, max_num_seqs: int = 64):
    """The engine the workers run (same model, block pool and batch limit), in this process."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    return LLMEngine.from_pretrained(
        model_path, EngineConfig(num_kv_blocks=kv_blocks, block_size=16, max_num_seqs=max_num_seqs)
    )


def engine_closed_loop(
    engine,
    concurrency: int,
    total_requests: int,
    max_tokens: int,
    prompt_len: int,
    progress: Progress | None = None,
    offset: int = 0,
) -> LoadResult:
    """The embedded baseline of :func:`sdk_closed_loop`: the same requests on ``engine`` stepped
    here (continuous batching), ``concurrency`` in flight, a finished one replaced at once."""
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    submitted = done = tokens = 0
    t0 = time.monotonic()
    while submitted < min(concurrency, total_requests):
        engine.add_request(f"e{offset + submitted}", prompt_ids(offset + submitted, prompt_len), params)
        submitted += 1
    while engine.has_unfinished():
        for out in engine.step():
            tokens += len(out.new_token_ids)
            if out.finished:
                done += 1
                if progress is not None:
                    progress.add()
                if submitted < total_requests:
                    engine.add_request(
                        f"e{offset + submitted}", prompt_ids(offset + submitted, prompt_len), params
                    )
                    submitted += 1
    return LoadResult(done, tokens, time.monotonic() - t0, {}, [])


def engine_ttfts(model_path: str, n: int, max_tokens: int, prompt_len: int, kv_blocks: int) -> list[float]:
    """TTFT of the same ``n`` requests on one engine alone (all submitted at once, stepped here,
    on one torch thread as a worker runs)."""
    with torch_threads(1):
        return _engine_ttfts(model_path, n, max_tokens, prompt_len, kv_blocks)


def _engine_ttfts(model_path: str, n: int, max_tokens: int, prompt_len: int, kv_blocks: int) -> list[float]:
    from engine.sampling_params import SamplingParams

    eng = make_engine(model_path, kv_blocks)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.monotonic()
    first: dict[str, float] = {}
    for i in range(n):
        eng.add_request(f"e{i}", prompt_ids(i, prompt_len), params)
    while eng.has_unfinished():
        for out in eng.step():
            if out.new_token_ids and out.request_id not in first:
                first[out.request_id] = time.monotonic() - t0
    eng.close()
    return list(first.values())


# ------------------------------------------------------------------------------- polling
class Poller:
    """Calls ``sample()`` every ``interval_s`` on a thread and keeps ``(monotonic time, value)``
    pairs (a failed sample is counted in ``errors``)."""

    def __init__(self, sample: Callable[[], object], interval_s: float = 0.05) -> None:
        self.sample = sample
        self.interval_s = interval_s
        self.samples: list[tuple[float, object]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-poller")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                v = self.sample()
            except Exception:  # noqa: BLE001 - counted
                self.errors += 1
            else:
                self.samples.append((time.monotonic(), v))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def ms(x: float) -> str:
    return f"{x * 1e3:.4f}"


def join(xs: Iterable[object], sep: str = ",") -> str:
    return sep.join(str(x) for x in xs)


def parse_modes(text: str, allowed: tuple[str, ...]) -> list[str]:
    """The comma-separated ``--modes`` value as a list; SystemExit naming any mode not in ``allowed``."""
    modes = [m for m in text.split(",") if m]
    bad = [m for m in modes if m not in allowed]
    if bad:
        raise SystemExit(f"--modes: unknown mode(s) {bad}; one of {allowed}")
    return modes


def require_positive(args: object, names: Iterable[str]) -> None:
    """SystemExit naming the first of the integer options ``names`` (attribute names of ``args``)
    below 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")


def add_closed_loop_args(p: argparse.ArgumentParser, *, requests_per_stream: int, prompt_len: int) -> None:
    """The options of an embedded closed loop (``--streams``, ``--requests-per-stream``,
    ``--max-tokens``, ``--prompt-len``) on ``p``, with these defaults for the last-but-one and last."""
    p.add_argument("--streams", type=int, default=64, help="requests in flight")
    p.add_argument(
        "--requests-per-stream",
        type=int,
        default=requests_per_stream,
        help="requests per stream (closed loop)",
    )
    p.add_argument("--max-tokens", type=int, default=256, help="tokens generated per request")
    p.add_argument("--prompt-len", type=int, default=prompt_len, help="prompt tokens per request")


def closed_loop_blocks(streams: int, prompt_len: int, max_tokens: int, block_size: int = 16) -> int:
    """KV blocks for ``streams`` requests of ``prompt_len + max_tokens`` tokens in flight at once
    (one spare block each, and 16 more)."""
    return streams * (-(-(prompt_len + max_tokens) // block_size) + 1) + 16
