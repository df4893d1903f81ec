"""The OpenAI HTTP front end vs the gRPC SDK: requests/s and TTFT of N concurrent streams.

One embedded cluster (store, router, 1 prefill + 1 decode worker processes on 127.0.0.1, the tiny
random-weight Llama of :mod:`tests.tiny_models` with SmolLM2's tokenizer) and one
:class:`pdserve.openai_api.OpenAIServer` (uvicorn, in this process) serve the run. For each N of
the sweep (default 200), in the same run:

* **gRPC**: N streams opened at once through :class:`pdserve.client.AsyncClient` (prompt token
  ids, greedy, ``ignore_eos``, ``--max-tokens`` tokens);
* **HTTP**: the same N requests as ``POST /v1/completions`` with ``stream: true`` and
  ``stream_options.include_usage``, each on its own HTTP/1.1 connection (an asyncio client, no
  thread per request), the SSE events read to ``[DONE]``.

Printed per N and per front: successes, requests/s (N / wall time of the wave), p50 / p99 TTFT
(request sent -> first token: the first SSE event of a choice / SDK chunk carrying token ids), and the
HTTP / gRPC ratios; plus the most threads this process had while the HTTP wave ran (the
front end spends no thread per connection). The waves alternate (gRPC, HTTP, gRPC, HTTP... with
``--rounds``) so machine noise hits both alike; each front's numbers are the median of its rounds.

Usage: python bench/openai_http.py [--sweep 200,1000] [--max-tokens 4] [--rounds 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.concurrency import percentile, prompt_ids, tiny_model  # noqa: E402


@dataclass
class HttpOutcome:
    """One HTTP request: status (0: no HTTP answer), completion tokens (from ``usage``), TTFT (s),
    whether the stream ended with ``[DONE]``, and what went wrong (empty when nothing)."""

    status: int
    tokens: int = 0
    ttft_s: float | None = None
    done: bool = False
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and not self.detail


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The response body as it arrives (chunked transfer encoding decoded)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()  # the blank line after the last chunk (no trailers sent)
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(1 << 16):
            yield data


async def http_stream(
    host: str, port: int, path: str, body: dict[str, Any], *, timeout_s: float = 120.0
) -> HttpOutcome:
    """POST ``body`` to ``path`` on a fresh connection (``Connection: close``) and read the SSE
    stream (or the error JSON) to its end. TTFT: from just before the request is written to the
    first event whose ``choices`` carry text."""
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode()
    out = HttpOutcome(0)
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                t0 = time.monotonic()
                writer.write(head + data)
                await writer.drain()
                status_line = await reader.readline()
                out.status = int(status_line.split()[1])
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    k, _, v = line.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                buf = b""
                async for part in _read_body(reader, headers):
                    buf += part
                    *events, buf = buf.split(b"\n\n")
                    for ev in events:
                        _event(out, ev, t0)
                if out.status != 200:
                    out.detail = buf.decode(errors="replace")[:300]
                elif buf.strip():
                    out.detail = f"trailing bytes after the last event: {buf[:80]!r}"
            finally:
                writer.close()
                await writer.wait_closed()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
        out.detail = out.detail or f"{type(e).__name__}: {e}"
    return out


def _event(out: HttpOutcome, ev: bytes, t0: float) -> None:
    if not ev.startswith(b"data: "):
        out.detail = f"not an SSE data event: {ev[:80]!r}"
        return
    payload = ev[len(b"data: ") :]
    if payload == b"[DONE]":
        out.done = True
        return
    obj = json.loads(payload)
    if "error" in obj:
        out.detail = obj["error"]["message"]
        return
    # the first token's event: a completion chunk (the first one; a token of a random model may
    # have no text of its own), or a chat chunk past the role-only one
    if out.ttft_s is None and any("text" in c or "content" in c.get("delta", {}) for c in obj["choices"]):
        out.ttft_s = time.monotonic() - t0
    if obj.get("usage"):
        out.tokens = obj["usage"]["completion_tokens"]


def completion_body(i: int, max_tokens: int, prompt_len: int) -> dict[str, Any]:
    """The streamed /v1/completions request of stream ``i`` (the same prompt as the gRPC wave's)."""
    return {
        "prompt": prompt_ids(i, prompt_len),
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def http_wave(
    host: str, port: int, n: int, max_tokens: int, prompt_len: int, timeout_s: float
) -> tuple[list[HttpOutcome], float, int]:
    """``n`` concurrent streamed completions; (outcomes, wall seconds, most threads seen)."""
    most = threading.active_count()
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal most
        while not stop.is_set():
            most = max(most, threading.active_count())
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    t0 = time.monotonic()
    try:
        outs = await asyncio.gather(
            *(
                http_stream(
                    host,
                    port,
                    "/v1/completions",
                    completion_body(i, max_tokens, prompt_len),
                    timeout_s=timeout_s,
                )
                for i in range(n)
            )
        )
    finally:
        wall = time.monotonic() - t0
        stop.set()
        await sampler
    return list(outs), wall, most


@dataclass
class SdkOutcome:
    ok: bool
    tokens: int = 0
    ttft_s: float | None = None
    detail: str = ""


async def sdk_wave(
    routers: str, n: int, max_tokens: int, prompt_len: int, timeout_s: float
) -> tuple[list[SdkOutcome], float]:
    """``n`` concurrent streams through one :class:`pdserve.client.AsyncClient`."""
    from pdserve.client import AsyncClient
    from pdserve.errors import PdserveError

    async def one(c: AsyncClient, i: int) -> SdkOutcome:
        out = SdkOutcome(False)
        t0 = time.monotonic()
        try:
            async for ch in c.generate(
                prompt_ids(i, prompt_len),
                max_tokens=max_tokens,
                temperature=0.0,
                ignore_eos=True,
                timeout=timeout_s,
            ):
                if ch.token_ids and out.ttft_s is None:
                    out.ttft_s = time.monotonic() - t0
                out.tokens += len(ch.token_ids)
                out.ok = out.ok or ch.finish is not None
        except PdserveError as e:
            out.ok, out.detail = False, str(e)
        return out

    async with AsyncClient(routers) as c:
        t0 = time.monotonic()
        outs = await asyncio.gather(*(one(c, i) for i in range(n)))
        return list(outs), time.monotonic() - t0


@dataclass
class FrontResult:
    ok: int
    n: int
    rps: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    first_failure: str = ""


@dataclass
class Row:
    n: int
    grpc: FrontResult
    http: FrontResult
    rps_ratio: float  # http / grpc
    p50_ratio: float | None
    p99_ratio: float | None
    http_max_threads: int
    rounds: list[dict[str, Any]] = field(default_factory=list)


def _front(n: int, oks: list[bool], ttfts: list[float], wall: float, failure: str) -> FrontResult:
    return FrontResult(sum(oks), n, n / wall, percentile(ttfts, 0.5), percentile(ttfts, 0.99), failure)


def _median_front(rs: list[FrontResult]) -> FrontResult:
    def med(xs: list[float | None]) -> float | None:
        vals = [x for x in xs if x is not None]
        return statistics.median(vals) if vals else None

    return FrontResult(
        min(r.ok for r in rs),
        rs[0].n,
        statistics.median(r.rps for r in rs),
        med([r.ttft_p50_s for r in rs]),
        med([r.ttft_p99_s for r in rs]),
        next((r.first_failure for r in rs if r.first_failure), ""),
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


async def compare(
    routers: str,
    host: str,
    port: int,
    n: int,
    max_tokens: int,
    prompt_len: int,
    rounds: int,
    timeout_s: float,
) -> Row:
    """Alternate gRPC and HTTP waves of ``n`` streams ``rounds`` times; medians per front."""
    g_res, h_res, threads = [], [], 0
    for _ in range(rounds):
        souts, swall = await sdk_wave(routers, n, max_tokens, prompt_len, timeout_s)
        g_res.append(
            _front(
                n,
                [o.ok and o.tokens == max_tokens for o in souts],
                [o.ttft_s for o in souts if o.ttft_s is not None],
                swall,
                next(
                    (o.detail or f"{o.tokens} tokens" for o in souts if not o.ok or o.tokens != max_tokens),
                    "",
                ),
            )
        )
        houts, hwall, most = await http_wave(host, port, n, max_tokens, prompt_len, timeout_s)
        threads = max(threads, most)
        h_res.append(
            _front(
                n,
                [o.ok and o.tokens == max_tokens for o in houts],
                [o.ttft_s for o in houts if o.ttft_s is not None],
                hwall,
                next(
                    (
                        f"{o.status}: {o.detail or f'{o.tokens} tokens'}"
                        for o in houts
                        if not o.ok or o.tokens != max_tokens
                    ),
                    "",
                ),
            )
        )
    g, h = _median_front(g_res), _median_front(h_res)
    return Row(
        n,
        g,
        h,
        h.rps / g.rps,
        _ratio(h.ttft_p50_s, g.ttft_p50_s),
        _ratio(h.ttft_p99_s, g.ttft_p99_s),
        threads,
        [{"grpc": asdict(a), "http": asdict(b)} for a, b in zip(g_res, h_res, strict=True)],
    )


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def build_parser() -> argparse.ArgumentParser:
    """This benchmark's command line."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(prog="python bench/openai_http.py", description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", default="200", help="comma-separated stream counts (e.g. 200,1000)")
    ap.add_argument("--max-tokens", type=int, default=4, help="tokens generated per stream")
    ap.add_argument("--prompt-len", type=int, default=8, help="prompt tokens per stream")
    ap.add_argument(
        "--rounds", type=int, default=2, help="alternating gRPC/HTTP waves per N (medians reported)"
    )
    ap.add_argument("--timeout-s", type=float, default=300.0, help="deadline of each stream")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    return cli_help.apply(ap)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    sweep = [int(x) for x in a.sweep.split(",") if x.strip()]
    from pdserve.launcher import ClusterSpec, launch
    from pdserve.openai_api.server import OpenAIServer, ServerConfig

    with tempfile.TemporaryDirectory(prefix="pdserve-openai-bench-") as tmp:
        model = tiny_model(Path(tmp))
        cl = launch(ClusterSpec(model_path=str(model), num_prefill=1, num_decode=1, worker_kv_blocks=4096))
        try:
            cfg = ServerConfig(router=cl.router_address, port=0, request_timeout_s=a.timeout_s, tls="off")
            srv = OpenAIServer(cfg)  # plain HTTP on 127.0.0.1, asked for (the cluster is plaintext too)
            with srv.start():
                rows = [
                    asyncio.run(
                        compare(
                            cl.router_address,
                            srv.host,
                            srv.port,
                            n,
                            a.max_tokens,
                            a.prompt_len,
                            a.rounds,
                            a.timeout_s,
                        )
                    )
                    for n in sweep
                ]
        finally:
            cl.stop()
    print(f"{'N':>6} {'front':>5} {'ok':>6} {'req/s':>8} {'p50 TTFT ms':>12} {'p99 TTFT ms':>12}")
    for r in rows:
        for name, f in (("gRPC", r.grpc), ("HTTP", r.http)):
            print(
                f"{r.n:>6} {name:>5} {f.ok:>6} {f.rps:>8.1f} {_ms(f.ttft_p50_s):>12} {_ms(f.ttft_p99_s):>12}"
            )
            if f.first_failure:
                print(f"{'':>13}first failure: {f.first_failure}")
        print(
            f"{r.n:>6} HTTP/gRPC: req/s {_x(r.rps_ratio)}, p50 TTFT {_x(r.p50_ratio)}, "
            f"p99 TTFT {_x(r.p99_ratio)}; most threads during the HTTP wave: {r.http_max_threads}"
        )
    if a.out:
        Path(a.out).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0 if all(r.grpc.ok == r.n and r.http.ok == r.n for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
