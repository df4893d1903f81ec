"""gRPC floor: the CPU per request of the bare grpc.aio message pattern of one direct request (#12).

What one disaggregated request with a direct token stream costs in gRPC alone, with no work
behind any call: the same processes (client, router, prefill worker, decode worker, KV store),
the same calls and the same messages, each a real pdserve protobuf message, on ``grpc.aio``
servers with no interceptors, no placement, no engine, no logging and no metrics:

* client -> router ``Generate`` (server streaming): one request, three responses (the prefill's
  first token, the redirect, the finish);
* router -> prefill ``Prefill`` (unary); prefill -> store ``PutBlocks`` (unary, ``--kv-bytes`` of
  payload: the request's KV);
* router -> decode ``Decode`` (server streaming): one request, two responses (admission, finish);
  decode -> store ``Release`` (unary: the handle's lease; the blocks are read from shared memory
  with no rpc);
* client <-> decode ``DirectStream.Attach`` (bidirectional, one call per client, shared by its
  requests): one attach message per request and ``--deltas`` messages of one delta each (the
  real worker multiplexes the deltas of all of a client's requests into one message per engine
  step, so at high concurrency it writes fewer: this part of the floor is an upper bound).

Each process is this script with ``--role``; :func:`measure_floor` starts them, drives
``--streams`` closed-loop streams of ``--requests`` requests from this process and returns the
CPU milliseconds per request of each process (``/proc``). ``bench/serving_efficiency.py`` runs it
in the same run as the cluster, so each process's figure can be set against its floor.

Variants pdserve does not implement, to see what a change of pattern would save:
``--merged-first on`` (the first token sent with the redirect: two Generate responses),
``--one-call on`` (the router calls only Decode; the decode worker calls Prefill and sends the
router the first token) and ``--early-redirect on`` (the redirect sent with the first token,
before the decode worker admits the request, so that the worker sends no admission message:
two Generate responses and one Decode response, no later first token).

Usage: python bench/grpc_floor.py [--streams 64] [--requests 512] [--deltas 8] [--kv-bytes 8192]
       [--merged-first on|off] [--one-call on|off] [--early-redirect on|off]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench.cluster_load import process_cpu_s  # noqa: E402
from pdserve.v1 import (  # noqa: E402
    client_pb2,
    client_pb2_grpc,
    common_pb2,
    direct_pb2,
    direct_pb2_grpc,
    kv_store_pb2,
    kv_store_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

ROLES = ("store", "prefill", "decode", "router")


@dataclass(frozen=True)
class FloorResult:
    """CPU ms per request of each process (``client``: the driving process), the wall time, and
    the context switches per request of each process (voluntary, involuntary; all its threads)."""

    requests: int
    streams: int
    deltas: int
    wall_s: float
    cpu_ms_per_request: dict[str, float]
    switches_per_request: dict[str, tuple[float, float]] = field(default_factory=dict)


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of every thread of process ``pid`` so far
    (``/proc/<pid>/task/*/status``; a thread that ended meanwhile is not counted)."""
    vol = invol = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        invol += int(line.split()[1])
        except OSError:  # the thread ended
            continue
    return vol, invol


# ------------------------------------------------------------------------------ the servers
class _Store(kv_store_pb2_grpc.KVStoreServicer):
    async def PutBlocks(self, req, ctx):  # noqa: N802
        return kv_store_pb2.PutResponse(lease_id="lease")

    async def Release(self, req, ctx):  # noqa: N802
        return kv_store_pb2.ReleaseResponse()


class _Prefill(worker_pb2_grpc.WorkerServicer):
    def __init__(self, store: str, kv_bytes: int) -> None:
        self.store = kv_store_pb2_grpc.KVStoreStub(grpc.aio.insecure_channel(store))
        self.payload = b"\0" * kv_bytes

    async def Prefill(self, req, ctx):  # noqa: N802
        put = kv_store_pb2.PutBlocksRequest()
        put.blocks.add(block_hash=b"h" * 16, data=self.payload)
        r = await self.store.PutBlocks(put)
        return worker_pb2.PrefillResponse(
            request_id=req.request_id, first_token=1, kv={"lease_id": r.lease_id}
        )


class _Decode(worker_pb2_grpc.WorkerServicer, direct_pb2_grpc.DirectStreamServicer):
    """Decode: release the lease, admit (one message), wait for the client's attach, write the
    request's deltas on its Attach call, then the finish to the router."""

    def __init__(
        self, store: str, deltas: int, tokens_per_delta: int, prefill: str = "", admit: bool = True
    ) -> None:
        self.store = kv_store_pb2_grpc.KVStoreStub(grpc.aio.insecure_channel(store))
        self.admit = admit  # send the admission message (off: --early-redirect)
        self.deltas, self.tpd = deltas, tokens_per_delta
        self.attached: dict[str, asyncio.Future] = {}
        # --one-call: the decode worker calls Prefill itself and sends the router the first token
        self.prefill = worker_pb2_grpc.WorkerStub(grpc.aio.insecure_channel(prefill)) if prefill else None

    def _slot(self, rid: str) -> asyncio.Future:
        f = self.attached.get(rid)
        if f is None:
            f = self.attached[rid] = asyncio.get_running_loop().create_future()
        return f

    async def Decode(self, req, ctx):  # noqa: N802
        rid = req.request_id
        if self.prefill is not None:
            p = await self.prefill.Prefill(worker_pb2.PrefillRequest(request_id=rid))
            yield worker_pb2.DecodeResponse(request_id=rid, token_ids=[p.first_token], text="a")
        await self.store.Release(kv_store_pb2.ReleaseRequest(lease_id="lease"))
        if self.admit:
            yield worker_pb2.DecodeResponse(request_id=rid)
        out: asyncio.Queue = await self._slot(rid)  # the client's Attach call's queue
        del self.attached[rid]
        toks = list(range(self.tpd))
        for i in range(self.deltas):
            d = direct_pb2.DirectDelta(request_id=rid, token_ids=toks, text="ab" * self.tpd)
            d.done = i == self.deltas - 1
            out.put_nowait(d)
        yield worker_pb2.DecodeResponse(
            request_id=rid,
            token_ids=toks * self.deltas,
            finish=common_pb2.Finish(reason=common_pb2.FINISH_REASON_LENGTH),
        )

    async def Attach(self, requests, ctx):  # noqa: N802
        """One writer per connection (as the real worker's): one message per delta."""
        out: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            async for r in requests:
                f = self._slot(r.attach.request_id)
                if not f.done():
                    f.set_result(out)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                d = await out.get()
                await ctx.write(direct_pb2.AttachResponse(deltas=[d]))
        finally:
            reader.cancel()


class _Router(client_pb2_grpc.GenerateServicer):
    def __init__(
        self,
        prefill: str,
        decode: str,
        decode_address: str,
        merged: bool = False,
        one_call: bool = False,
        early: bool = False,
    ) -> None:
        self.prefill = worker_pb2_grpc.WorkerStub(grpc.aio.insecure_channel(prefill))
        self.decode = worker_pb2_grpc.WorkerStub(grpc.aio.insecure_channel(decode))
        self.decode_address = decode_address
        self.merged = merged  # the first token goes with the redirect (two responses, not three)
        self.one_call = one_call  # no Prefill call: the decode worker prefills (its first message)
        self.early = early  # the redirect goes with the first token; the worker sends no admission

    async def Generate(self, req, ctx):  # noqa: N802
        rid = req.request_id
        grant = direct_pb2.DirectGrant(ticket=rid)
        if self.one_call:
            first = client_pb2.GenerateResponse(request_id=rid)
            call = self.decode.Decode(worker_pb2.DecodeRequest(request_id=rid, direct=grant))
        else:
            p = await self.prefill.Prefill(worker_pb2.PrefillRequest(request_id=rid))
            first = client_pb2.GenerateResponse(request_id=rid, token_ids=[p.first_token], text="a")
            if self.early:
                first.direct.CopyFrom(
                    direct_pb2.DirectRedirect(address=self.decode_address, request_id=rid, ticket=rid)
                )
                yield first
            elif not self.merged:
                yield first
            call = self.decode.Decode(worker_pb2.DecodeRequest(request_id=rid, kv=p.kv, direct=grant))
        n = 0
        async for m in call:
            if self.one_call and n == 0 and m.token_ids and not m.HasField("finish"):  # the first token
                n += len(m.token_ids)
                first.token_ids.extend(m.token_ids)
                first.text = m.text
                if not self.merged:
                    yield first
                continue
            if not self.early and not m.token_ids and not m.HasField("finish"):  # admitted: redirect
                redirect = direct_pb2.DirectRedirect(address=self.decode_address, request_id=rid, ticket=rid)
                if self.merged:
                    first.direct.CopyFrom(redirect)
                    yield first
                else:
                    yield client_pb2.GenerateResponse(request_id=rid, direct=redirect)
            n += len(m.token_ids)
            if m.HasField("finish"):
                f = common_pb2.Finish()
                f.CopyFrom(m.finish)
                f.usage.completion_tokens = n + 1
                yield client_pb2.GenerateResponse(request_id=rid, finish=f)


async def _serve(a: argparse.Namespace) -> None:
    server = grpc.aio.server()
    if a.role == "store":
        kv_store_pb2_grpc.add_KVStoreServicer_to_server(_Store(), server)
    elif a.role == "prefill":
        worker_pb2_grpc.add_WorkerServicer_to_server(_Prefill(a.store, a.kv_bytes), server)
    elif a.role == "decode":
        d = _Decode(
            a.store,
            a.deltas,
            a.tokens_per_delta,
            a.prefill if a.one_call == "on" else "",
            admit=a.early_redirect != "on",
        )
        worker_pb2_grpc.add_WorkerServicer_to_server(d, server)
        direct_pb2_grpc.add_DirectStreamServicer_to_server(d, server)
    else:
        client_pb2_grpc.add_GenerateServicer_to_server(
            _Router(
                a.prefill,
                a.decode,
                a.decode,
                a.merged_first == "on",
                a.one_call == "on",
                a.early_redirect == "on",
            ),
            server,
        )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


# ------------------------------------------------------------------------------ the client
async def _drive(router: str, streams: int, n: int, offset: int) -> float:
    """``n`` requests over ``streams`` closed-loop streams; wall seconds."""
    ch = grpc.aio.insecure_channel(router)
    gen = client_pb2_grpc.GenerateStub(ch)
    attach_q: asyncio.Queue = asyncio.Queue()
    done: dict[str, asyncio.Future] = {}
    attach_call = None
    dch = None

    async def attach_requests():
        while True:
            yield await attach_q.get()

    async def read_attach(call) -> None:
        try:
            await _read_attach(call)
        except BaseException as e:  # noqa: BLE001 - every waiting stream fails with it
            for f in list(done.values()):
                if not f.done():
                    f.set_exception(RuntimeError(f"grpc floor: the direct stream failed: {e!r}"))

    async def _read_attach(call) -> None:
        async for resp in call:
            for d in resp.deltas:
                if d.done:
                    f = done.pop(d.request_id, None)
                    if f is not None and not f.done():
                        f.set_result(None)

    next_id = iter(range(offset, offset + n))

    async def stream() -> None:
        nonlocal attach_call, dch
        for i in next_id:
            rid = f"floor-{i}"
            fut = done[rid] = asyncio.get_running_loop().create_future()
            finish = None
            async for m in gen.Generate(client_pb2.GenerateRequest(request_id=rid)):
                if m.HasField("direct"):
                    if attach_call is None:
                        dch = grpc.aio.insecure_channel(m.direct.address)
                        attach_call = direct_pb2_grpc.DirectStreamStub(dch).Attach(attach_requests())
                        asyncio.ensure_future(read_attach(attach_call))
                    attach_q.put_nowait(
                        direct_pb2.AttachRequest(
                            attach=direct_pb2.DirectAttach(
                                request_id=m.direct.request_id, ticket=m.direct.ticket
                            )
                        )
                    )
                if m.HasField("finish"):
                    finish = m
            await fut
            if finish is None:
                raise RuntimeError(f"{rid}: no finish")

    t0 = time.monotonic()
    await asyncio.gather(*(stream() for _ in range(streams)))
    wall = time.monotonic() - t0
    if attach_call is not None:
        attach_call.cancel()
    await ch.close()
    if dch is not None:
        await dch.close()
    return wall


def _start(role: str, *args: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--role", role, *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    line = p.stdout.readline() if p.stdout else ""
    if not line.strip().isdigit():
        p.kill()
        p.wait(timeout=10)
        if p.stdout is not None:
            p.stdout.close()
        raise RuntimeError(f"grpc floor: the {role} process did not start")
    return p, f"127.0.0.1:{int(line)}"


def measure_floor(
    streams: int,
    requests: int,
    deltas: int,
    tokens_per_delta: int = 4,
    kv_bytes: int = 8192,
    merged_first: bool = False,
    one_call: bool = False,
    early_redirect: bool = False,
) -> FloorResult:
    """Start the four server processes, warm up, drive ``requests`` requests over ``streams``
    streams, stop them; CPU ms per request of each process (``client``: this one).
    ``merged_first``: the router sends the first token with the redirect (a variant the cluster
    does not implement: what one client write less would save); ``one_call``: the router makes one
    call (Decode), the decode worker calls Prefill and sends the router the first token (a variant
    the cluster does not implement: what one router call less would save); ``early_redirect``: the
    redirect goes with the first token and the decode worker sends no admission message (a variant
    the cluster does not implement: one Generate response and one Decode response less, no later
    first token)."""
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["store"], store = _start("store")
        procs["prefill"], prefill = _start("prefill", "--store", store, "--kv-bytes", str(kv_bytes))
        procs["decode"], decode = _start(
            "decode",
            "--store",
            store,
            "--deltas",
            str(deltas),
            "--tokens-per-delta",
            str(tokens_per_delta),
            *(("--one-call", "on", "--prefill", prefill) if one_call else ()),
            "--early-redirect",
            "on" if early_redirect else "off",
        )
        procs["router"], router = _start(
            "router",
            "--prefill",
            prefill,
            "--decode",
            decode,
            "--merged-first",
            "on" if merged_first else "off",
            "--one-call",
            "on" if one_call else "off",
            "--early-redirect",
            "on" if early_redirect else "off",
        )
        asyncio.run(_drive(router, min(streams, 16), min(streams, 16), 10**6))  # warm-up
        pids = {k: p.pid for k, p in procs.items()}
        pids["client"] = os.getpid()
        t0 = {k: process_cpu_s(p) for k, p in pids.items()}
        s0 = {k: context_switches(p) for k, p in pids.items()}
        wall = asyncio.run(_drive(router, streams, requests, 0))
        cpu = {k: (process_cpu_s(p) - t0[k]) / requests * 1e3 for k, p in pids.items()}
        cpu["all"] = sum(cpu.values())
        switches = {}
        for k, p in pids.items():
            s1 = context_switches(p)
            switches[k] = ((s1[0] - s0[k][0]) / requests, (s1[1] - s0[k][1]) / requests)
        return FloorResult(requests, streams, deltas, wall, cpu, switches)
    finally:
        for p in procs.values():
            p.kill()
            p.wait(timeout=10)
            if p.stdout is not None:
                p.stdout.close()


def build_parser() -> argparse.ArgumentParser:
    from pdserve import cli_help

    ap = argparse.ArgumentParser(prog="python bench/grpc_floor.py", description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=64, help="concurrent closed-loop streams")
    ap.add_argument("--requests", type=int, default=512, help="requests measured")
    ap.add_argument("--deltas", type=int, default=8, help="direct-stream messages per request")
    ap.add_argument("--tokens-per-delta", type=int, default=4, help="token ids in each delta")
    ap.add_argument("--kv-bytes", type=int, default=8192, help="PutBlocks payload bytes per request")
    ap.add_argument(
        "--merged-first",
        choices=("on", "off"),
        default="off",
        help="the router sends the first token with the redirect: two Generate responses, not three "
        "(a variant pdserve does not implement: what it would save)",
    )
    ap.add_argument(
        "--one-call",
        choices=("on", "off"),
        default="off",
        help="the router makes one call per request (Decode; the decode worker calls Prefill and sends "
        "the router the first token) instead of Prefill then Decode (a variant pdserve does not implement)",
    )
    ap.add_argument(
        "--early-redirect",
        choices=("on", "off"),
        default="off",
        help="the router sends the redirect with the first token, before the decode worker admits the "
        "request, and the worker sends no admission message (a variant pdserve does not implement)",
    )
    ap.add_argument("--role", choices=ROLES, default=None, help="internal: run one server process")
    ap.add_argument("--store", default="", help="internal: the store's address (--role)")
    ap.add_argument("--prefill", default="", help="internal: the prefill server's address (--role)")
    ap.add_argument("--decode", default="", help="internal: the decode server's address (--role)")
    return cli_help.apply(ap)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.role is not None:
        asyncio.run(_serve(a))
        return 0
    r = measure_floor(
        a.streams,
        a.requests,
        a.deltas,
        a.tokens_per_delta,
        a.kv_bytes,
        merged_first=a.merged_first == "on",
        one_call=a.one_call == "on",
        early_redirect=a.early_redirect == "on",
    )
    per = "  ".join(f"{k} {v:.3f}" for k, v in r.cpu_ms_per_request.items())
    print(
        f"gRPC floor{' (first token with the redirect)' if a.merged_first == 'on' else ''}"
        f"{' (one router call: Decode, which calls Prefill)' if a.one_call == 'on' else ''}"
        f"{' (redirect with the first token, no admission message)' if a.early_redirect == 'on' else ''}, "
        f"{r.streams} streams, {r.requests} requests, {r.deltas} direct messages per request "
        f"({r.wall_s:.2f} s, load {' / '.join(f'{x:.1f}' for x in os.getloadavg())}):"
    )
    print(f"  CPU ms per request: {per}")
    sw = "  ".join(f"{k} {v:.1f}/{i:.1f}" for k, (v, i) in r.switches_per_request.items())
    print(f"  context switches per request (voluntary/involuntary): {sw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
